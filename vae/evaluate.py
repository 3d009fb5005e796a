"""Held-out metrics: ELBO, its terms, and the importance-weighted estimate of log p(y)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vae.elbo import kl_per_dim
from vae.model import LOG_2PI, VAE
from vae.terms import TERMS
from vae.transfer import device_batches

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: Cov_y(E_q[z_j]) above this counts as active


@dataclass(frozen=True)
class RowScores:
    log_likelihood: torch.Tensor  # (N,) IWAE_K estimate of log p(y), nats, original units
    stderr: torch.Tensor  # (N,) its Monte Carlo standard error (delta method; NaN when K = 1: unknown)
    recon: torch.Tensor  # (N,) (1/K) sum_k log p(y|z_k)
    kl: torch.Tensor  # (N,) analytic KL
    recon_cells: torch.Tensor  # (N, D) per-cell share of recon
    mu: torch.Tensor  # (N, K_latent) posterior means
    kl_dims: torch.Tensor  # (N, K_latent)

    @property
    def elbo(self) -> torch.Tensor:
        return self.recon - self.kl


@dataclass(frozen=True)
class Evaluation:
    n_rows: int
    elbo: float
    reconstruction: float
    kl: float
    log_likelihood: float
    log_likelihood_stderr: float  # NaN when iw_samples = 1: one sample says nothing of its error
    iw_samples: int
    kl_per_dim: tuple[float, ...]
    active_units: int
    per_feature_reconstruction: tuple[float, ...]


@torch.no_grad()
def _score_batch(model: VAE, y: torch.Tensor, eps: torch.Tensor, chunk: int) -> RowScores:
    """eps (K, B or 1, K_latent): the standard normal draws behind z = mu + sigma * eps."""
    x, mask = model.standardize(y)
    post = model.encode(x, mask)
    k, n_lat = eps.shape[0], post.mu.shape[-1]
    logw = torch.empty((k, x.shape[0]), dtype=torch.float64, device=x.device)
    cells = torch.zeros_like(x, dtype=torch.float64)
    sigma = (0.5 * post.logvar).exp()
    # log q(z|y) from the eps that drew z: no cancellation in (z - mu) when |mu| >> sigma
    log_qz_const = -0.5 * post.logvar.sum(-1) - 0.5 * n_lat * LOG_2PI  # (B,)
    for start in range(0, k, chunk):
        e = eps[start : start + chunk]  # (m, B or 1, K)
        z = post.mu + sigma * e  # (m, B, K)
        log_px = model.log_px_z(x, model.decode(z), mask)  # (m, B, D)
        log_pz = -0.5 * (z.pow(2).sum(-1) + n_lat * LOG_2PI)
        log_qz = -0.5 * e.pow(2).sum(-1) + log_qz_const
        logw[start : start + e.shape[0]] = (log_px.sum(-1) + log_pz - log_qz).double()
        cells += log_px.double().sum(0)
    # IWAE (Burda et al. 2016): log (1/K) sum_k w_k, w_k = p(y|z_k) p(z_k) / q(z_k|y)
    lse = torch.logsumexp(logw, dim=0)
    ll = lse - math.log(k)
    w = torch.exp(logw - lse) * k  # normalized weights, mean 1 per row
    var = (w.pow(2).sum(0) - k) / (k - 1) if k > 1 else torch.full_like(ll, math.nan)
    kl_dims = kl_per_dim(post).double()
    recon = cells.sum(-1) / k
    return RowScores(ll, (var.clamp_min(0) / k).sqrt(), recon, kl_dims.sum(-1), cells / k, post.mu.double(), kl_dims)


@torch.no_grad()
def score_rows(
    model: VAE, y: torch.Tensor, iw_samples: int = 1000, seed: int = 0, batch_rows: int = 256,
    *, common_eps: bool = False,
) -> RowScores:
    """Per-row IWAE log-likelihood, ELBO terms and posterior means, batched over rows and samples.

    common_eps: every row uses the same K standard-normal draws (common random numbers), so a
    row's score depends on the row alone, not on its position or on how rows are batched: for
    per-row anomaly scores. They are drawn by a CPU generator and moved (K x K_latent numbers), so
    a row's score is also the same on every device: the anomaly threshold placed where the model
    trained compares with the scores of `embed` wherever that runs. Otherwise draws are
    independent across rows (unbiased mean errors), from a generator on the model's device.
    """
    model.eval()
    device = next(model.parameters()).device
    n_lat, chunk = model.latent_dim, max(1, 65536 // batch_rows)  # bounded (chunk * rows) decoder calls
    shared = None
    if common_eps:
        shared = torch.randn((iw_samples, 1, n_lat), generator=torch.Generator().manual_seed(seed)).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    parts = []
    for _, rows in device_batches(y, batch_rows, device):  # pinned, overlapped copies on CUDA
        eps = shared if shared is not None else torch.randn((iw_samples, rows.shape[0], n_lat), generator=gen, device=device)
        parts.append(_score_batch(model, rows, eps, chunk))
    # one copy back per field, after the last batch: no wait per batch
    return RowScores(*(_to_host(torch.cat([getattr(p, f) for p in parts])) for f in RowScores.__dataclass_fields__))


def _to_host(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else t.to("cpu")


def summarize(scores: RowScores, iw_samples: int) -> Evaluation:
    """Average per-row scores into the metrics of the metrics JSON (nats per row)."""
    n = scores.log_likelihood.shape[0]
    mu_var = scores.mu.var(0, unbiased=False) if n > 1 else torch.zeros(scores.mu.shape[1])
    return Evaluation(
        n_rows=n,
        **{t.key: float(getattr(scores, t.name).mean()) for t in TERMS},  # elbo, reconstruction, kl
        log_likelihood=float(scores.log_likelihood.mean()),
        log_likelihood_stderr=float(scores.stderr.pow(2).sum().sqrt() / n),
        iw_samples=iw_samples,
        kl_per_dim=tuple(float(v) for v in scores.kl_dims.mean(0)),
        active_units=int((mu_var > ACTIVE_UNIT_THRESHOLD).sum()),
        # nats per row (missing cells count 0): the columns add up to `reconstruction`
        per_feature_reconstruction=tuple(float(v) for v in scores.recon_cells.sum(0) / max(n, 1)),
    )


def evaluate(model: VAE, y: torch.Tensor, iw_samples: int = 1000, seed: int = 0, batch_rows: int = 256) -> Evaluation:
    """Metrics of a table (N, D) in original units; the same seed gives the same numbers."""
    scores = score_rows(model, y, iw_samples, seed, batch_rows)
    return summarize(scores, iw_samples)
