"""Classical baselines every model must meet, fitted in closed form on the training rows.

`diag_gauss` (independent Gaussians), `full_gauss` (one full-covariance Gaussian) and `ppca`
(probabilistic PCA with the model's latent size, on the scale the model's noise is learned on;
Tipping & Bishop 1999), all maximum likelihood, scored in nats per row in the table's original
units. Binary columns get independent Bernoullis in every baseline, categorical columns
independent categoricals at their training level frequencies (so that a model's gain over
`full_gauss` is what it adds to the full Gaussian and the frequencies); with missing cells the
Gaussians are fitted on the complete rows and score each row's observed cells (their marginal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from vae.noise import gaussian_cells
from vae.table import TableSpec

LOG_2PI = math.log(2 * math.pi)
NAMES = ("diag_gauss", "full_gauss", "ppca")


@dataclass(frozen=True)
class Baselines:
    gauss_index: torch.Tensor  # (G,) the Gaussian columns
    mean: torch.Tensor  # (G,) original units, float64
    cov: torch.Tensor  # (G, G) the full Gaussian's covariance (MLE, 1/N)
    ppca_cov: torch.Tensor  # (G, G) W W^T + s^2 I, on the original scale
    binary_index: torch.Tensor  # (B,) the Bernoulli columns
    binary_p: torch.Tensor  # (B,) their frequency of ones
    # the categorical columns and the log frequency of each level (C, Lmax), -inf past a column's
    # levels; None in baselines saved before categorical columns existed
    cat_index: torch.Tensor | None = None
    cat_log_p: torch.Tensor | None = None

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> Baselines:
        return cls(**d)

    def log_prob(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row log-likelihood (N,) of each baseline; missing (NaN) cells are marginalized.

        Computed where the fit lives (the CPU, float64), whatever the device of y."""
        y = y.detach().to(self.mean.device, torch.float64)
        g = y[:, self.gauss_index]
        observed = ~torch.isnan(g)
        mask = None if bool(observed.all()) else observed.double()
        counts = observed.double().sum(-1)
        binary = self._bernoulli(y) + self._categorical(y)
        out = {}
        for name, cov in (("diag_gauss", torch.diag(self.cov.diagonal())), ("full_gauss", self.cov), ("ppca", self.ppca_cov)):
            # on the scale of the columns' spread: Cholesky of a correlation-like matrix, then the Jacobian
            s = cov.diagonal().sqrt()
            resid = torch.where(observed, (g - self.mean) / s, 0.0)
            cells = gaussian_cells(resid, torch.linalg.cholesky(cov / (s[:, None] * s[None, :])), mask) - s.log()
            cells = cells if mask is None else cells * mask
            out[name] = cells.sum(-1) - 0.5 * LOG_2PI * counts + binary
        return out

    def _bernoulli(self, y: torch.Tensor) -> torch.Tensor:
        b = y[:, self.binary_index]
        p = self.binary_p
        cells = torch.where(b == 1, p.log(), (1 - p).log())
        return torch.where(torch.isnan(b), 0.0, cells).sum(-1)

    def _categorical(self, y: torch.Tensor) -> torch.Tensor:
        if self.cat_index is None or self.cat_log_p is None or self.cat_index.numel() == 0:
            return torch.zeros(y.shape[0], dtype=y.dtype)
        codes = y[:, self.cat_index]  # (N, C)
        missing = torch.isnan(codes)
        picked = self.cat_log_p.T.gather(0, torch.where(missing, 0.0, codes).long())  # (N, C)
        return torch.where(missing, 0.0, picked).sum(-1)


def _ppca_cov(cov: torch.Tensor, k: int) -> torch.Tensor:
    """W W^T + s^2 I of the pPCA MLE of a covariance: s^2 the mean discarded eigenvalue."""
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    n = cov.shape[0]
    if k >= n:
        return cov
    sigma2 = evals[k:].mean()
    w = evecs[:, :k] * (evals[:k] - sigma2).sqrt()
    return w @ w.T + sigma2 * torch.eye(n, dtype=cov.dtype)


def _positive_definite(cov: torch.Tensor) -> torch.Tensor:
    """cov with the least relative jitter on its diagonal that lets Cholesky succeed (collinear
    columns); relative to each column's variance, so that columns in small units are not swamped."""
    var = cov.diagonal()
    s = var.sqrt()
    corr = cov / (s[:, None] * s[None, :])
    jitter = 0.0
    for _ in range(12):
        candidate = corr + jitter * torch.eye(cov.shape[0], dtype=cov.dtype)
        if torch.linalg.cholesky_ex(candidate).info == 0:
            break
        jitter = max(jitter * 10, 1e-12)
    return s[:, None] * candidate * s[None, :]


def fit_baselines(y: torch.Tensor, spec: TableSpec, latent_dim: int) -> Baselines | None:
    """Fit on training rows y (N, D, original units); None when too few complete rows."""
    y = y.detach().double().cpu()
    gauss = torch.tensor([k == "gaussian" for k in spec.kinds])
    gi = torch.nonzero(gauss).flatten()
    bi = torch.nonzero(torch.tensor([k == "bernoulli" for k in spec.kinds])).flatten()
    ci = [j for j, k in enumerate(spec.kinds) if k == "categorical"]
    g = y[:, gi]
    g = g[~torch.isnan(g).any(-1)]
    if g.shape[0] <= gi.numel():
        return None
    mean = g.mean(0)
    cov = _positive_definite(torch.cov(g.T, correction=0).reshape(gi.numel(), gi.numel()))
    # pPCA on the scale the model learns its noise on: standardized columns, or the table's units
    s = g.std(0, correction=0) if spec.standardized else torch.ones(gi.numel(), dtype=g.dtype)
    ppca = _positive_definite(s[:, None] * _ppca_cov(cov / (s[:, None] * s[None, :]), latent_dim) * s[None, :])
    p = torch.nanmean(y[:, bi], dim=0).clamp(1e-6, 1 - 1e-6)
    if not ci:
        return Baselines(gi, mean, cov, ppca, bi, p)
    width = max(len(spec.levels_of(j)) for j in ci)
    log_p = torch.full((len(ci), width), -math.inf, dtype=torch.float64)
    for c, j in enumerate(ci):
        col = y[:, j][~torch.isnan(y[:, j])].long()
        counts = torch.bincount(col, minlength=len(spec.levels_of(j))).double()
        log_p[c, : counts.numel()] = (counts / counts.sum()).clamp_min(1e-12).log()
    return Baselines(gi, mean, cov, ppca, bi, p, torch.tensor(ci, dtype=torch.long), log_p)
