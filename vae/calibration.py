"""Where a row is an anomaly: the anomaly threshold, placed on rows the model did not train on.

A model scores its own training rows higher than new rows from the same distribution (on
sklearn's breast_cancer the default model: 46.3 against 38.6 nats/row), so a threshold at the
q-quantile of training rows' scores flags far more than q of new rows (29 % at q = 0.1).
Held-out rows are exchangeable with new ones: the q-quantile of their scores flags about q of
new rows (split conformal calibration).

With missing cells (data.missing: mask) log p(y_O) sums over the observed cells O only, so its
level depends on which cells are missing: in units where a cell's density is below 1 a row with
fewer cells scores higher and is never flagged; where it is above 1, it is flagged too often.
`MissingAdjustment` compares a row with held-out rows on s = (log p(y_O) - m(O)) / |O|^g:
m(O) = a + sum_{j in O} b_j, b_j what observing column j adds to the log-likelihood on average
(fitted on held-out rows scored again with 1 .. EXTRA_MASKED more of their cells masked, each
copy against its own row), a the mean over the held-out rows as they are; |O|^g the spread about
m(O), which narrows as cells go missing (a Gaussian's log-density has variance |O| / 2: g = 1/2).
Both are exact when the cells are independent Gaussians. The anomaly p-value is the share of
held-out rows whose s is at most the row's: the same scale whatever cells are missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vae.evaluate import score_rows
from vae.model import VAE

REFERENCE_POINTS = 1024  # order statistics of the held-out rows' adjusted scores kept in the model
EXTRA_MASKED = 3  # each copy of a held-out row has 1 .. this many more of its cells masked
MIN_PAIRS = 2048  # masked copies scored to fit b: copies of up to this many rows, at most MAX_COPIES each
MAX_COPIES = 32


@dataclass(frozen=True)
class MissingAdjustment:
    """s = (log p(y_O) - m(O)) / |O|^spread_power, m(O) = mean[0] + sum_{j in O} mean[1 + j];
    reference: ascending s of held-out rows."""

    mean: tuple[float, ...]  # (1 + D,) nats
    spread_power: float  # the spread of log p(y_O) about m(O) grows like |O|^this (a Gaussian: 1/2)
    reference: tuple[float, ...]  # at most REFERENCE_POINTS

    def adjusted(self, log_likelihood: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """(N,) s; observed (N, D) bool, True where a cell is observed."""
        mean = torch.tensor(self.mean, dtype=torch.float64)
        design = observed.to(torch.float64)
        spread = design.sum(1).clamp_min(1.0).pow(self.spread_power)
        return (log_likelihood.to(torch.float64) - (mean[0] + design @ mean[1:])) / spread

    def pvalue(self, adjusted: torch.Tensor) -> torch.Tensor:
        """(N,) the share of held-out rows whose adjusted score is at most each row's."""
        ref = torch.tensor(self.reference, dtype=torch.float64)
        return torch.searchsorted(ref, adjusted.to(torch.float64).contiguous(), right=True).double() / len(ref)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "spread_power": self.spread_power, "reference": list(self.reference)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MissingAdjustment:
        return cls(tuple(map(float, d["mean"])), float(d["spread_power"]), tuple(map(float, d["reference"])))


def _masked_copies(y: torch.Tensor, copies: int, generator: torch.Generator) -> torch.Tensor:
    """copies of y (N, D), each row with 1 .. EXTRA_MASKED more of its observed cells set to NaN
    (chosen at random; at least one cell stays observed): (copies * N, D)."""
    out = []
    observed = ~torch.isnan(y)
    n_obs = observed.sum(1, keepdim=True)
    for _ in range(copies):
        keys = torch.rand(y.shape, generator=generator, dtype=torch.float64)
        keys[~observed] = 2.0  # never chosen: already missing
        rank = keys.argsort(dim=1).argsort(dim=1)  # each cell's place in a random order of the row's cells
        extra = torch.randint(1, EXTRA_MASKED + 1, (y.shape[0], 1), generator=generator)
        out.append(torch.where(rank < torch.minimum(extra, n_obs - 1), torch.nan, y))
    return torch.cat(out)


def _lstsq(design: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Least squares with a tiny ridge, so that a column never masked stays defined."""
    gram = design.T @ design
    ridge = 1e-8 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge, design.T @ target)


def fit_missing_adjustment(model: VAE, y: torch.Tensor, log_likelihood: torch.Tensor, score_samples: int,
                           seed: int) -> MissingAdjustment:
    """m(O) from held-out rows y (N, D; NaN = missing), their scores log_likelihood (N,), and copies
    of up to MIN_PAIRS of them with more cells masked, scored as `embed` scores new rows
    (score_samples importance samples, common draws from seed). The reference: the rows' own s,
    with the cells they miss.

    Each copy is compared with its own row: the change of log p when cells S are masked is
    -sum_{j in S} b_j, fitted by least squares on these paired differences, in which what makes
    a row unusual cancels (a row far out changes a fit of the scores themselves by nats).
    """
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(y.shape[0], generator=generator)[:MIN_PAIRS]
    subset = y[pick].to(torch.float32)
    copies = max(1, min(MAX_COPIES, -(-MIN_PAIRS // subset.shape[0])))
    masked = _masked_copies(subset, copies, generator)
    extra = score_rows(model, masked, score_samples, seed, common_eps=True).log_likelihood.to(torch.float64)
    change = extra - log_likelihood.to(torch.float64)[pick].repeat(copies)
    removed = (torch.isnan(masked) & ~torch.isnan(subset).repeat(copies, 1)).to(torch.float64)
    b = -_lstsq(removed, change)
    # a: the mean of log p(y_O) - sum_{j in O} b_j over the rows as they are, so that s centres on 0
    observed = ~torch.isnan(y)
    a = float((log_likelihood.to(torch.float64) - observed.to(torch.float64) @ b).mean())
    centred = MissingAdjustment((a, *b.tolist()), 0.0, ())
    # the spread: E log|s| = log sigma(O) + const for a location-scale family; log|s| regressed on log|O|
    # over the rows and their copies (the log keeps a row far out from steering it)
    all_observed = torch.cat([observed, ~torch.isnan(masked)])
    resid = centred.adjusted(torch.cat([log_likelihood.to(torch.float64), extra]), all_observed).abs()
    count = all_observed.sum(1).to(torch.float64)
    keep = (resid > 0) & (count > 0)
    design = torch.stack([torch.ones_like(count[keep]), count[keep].log()], dim=1)
    power = float(_lstsq(design, resid[keep].log())[1]) if bool((count[keep] != count[keep][0]).any()) else 0.0
    fitted = MissingAdjustment(centred.mean, min(max(power, 0.0), 1.0), ())
    return MissingAdjustment(fitted.mean, fitted.spread_power, _reference(fitted.adjusted(log_likelihood, observed)))


def _reference(s: torch.Tensor) -> tuple[float, ...]:
    """The sorted scores, or REFERENCE_POINTS evenly spaced order statistics of them."""
    s = s.sort().values
    if s.shape[0] > REFERENCE_POINTS:
        s = torch.quantile(s, (torch.arange(REFERENCE_POINTS, dtype=torch.float64) + 0.5) / REFERENCE_POINTS)
    return tuple(float(v) for v in s)
