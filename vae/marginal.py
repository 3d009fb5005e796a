"""A learned monotone map of each real column before its Gaussian (model.marginal_units).

The decoder's Gaussian is a density on t = g(x), x the standardized column; y's density is that
Gaussian at g(x) times g'(x) (change of variables), so log-likelihoods stay in the table's units.
The encoder sees g(x) too, and the closed-form start is the full Gaussian of g(x) at the map's
start (nearly the identity), so the start is exact as without the map.
g_j(x) = x + sum_k a_jk tanh(b_jk (x - c_jk)), a_jk = softplus(alpha_jk) > 0, b_jk = exp(beta_jk):
g' = 1 + sum_k a_jk b_jk (1 - tanh^2) >= 1, so g is strictly increasing from R onto R, and
|g(x) - x| < sum_k a_jk bounds the inverse's bracket (bisection, exact to float precision).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

INIT_ALPHA = -5.0  # a = softplus(-5) = 0.0067 a unit: near the identity (8 units: |g(x) - x| < 0.054)
INIT_BETA = 1.0  # b = e: a unit bends over about one standard deviation of the column
CENTRES = 2.0  # the units' centres start evenly over [-2, 2] standard deviations
BISECTIONS = 60  # halvings of the inverse's bracket: below float64's resolution of x


class MarginalTransform(nn.Module):
    """g applied column-wise to (..., D) cells; `units` tanh units a column."""

    def __init__(self, n_columns: int, units: int):
        super().__init__()
        centres = torch.linspace(-CENTRES, CENTRES, units) if units > 1 else torch.zeros(1)
        self.alpha = nn.Parameter(torch.full((n_columns, units), INIT_ALPHA))
        self.beta = nn.Parameter(torch.full((n_columns, units), INIT_BETA))
        self.centre = nn.Parameter(centres.repeat(n_columns, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g(x) and log g'(x), each (..., D)."""
        a, b = F.softplus(self.alpha), self.beta.exp()
        t = torch.tanh(b * (x.unsqueeze(-1) - self.centre))  # (..., D, K)
        return x + (a * t).sum(-1), torch.log1p((a * b * (1 - t * t)).sum(-1))

    @torch.no_grad()
    def map_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """g(x) for float64 cells on the CPU, whatever the parameters' device (the closed-form start)."""
        return _g(x, *self._units(torch.device("cpu")))

    @torch.no_grad()
    def inverse(self, t: torch.Tensor) -> torch.Tensor:
        """x with g(x) = t, (..., D): bisection in [t - S, t + S], S = sum_k a_k (g - x lies within)."""
        a, b, c = self._units(t.device)
        target = t.double()
        lo, hi = target - a.sum(-1), target + a.sum(-1)
        for _ in range(BISECTIONS):
            mid = 0.5 * (lo + hi)
            below = _g(mid, a, b, c) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (0.5 * (lo + hi)).to(t.dtype)

    def _units(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """a, b and c, detached, in float64 on `device`."""
        return tuple(p.detach().to(device, torch.float64)  # type: ignore[return-value]
                     for p in (F.softplus(self.alpha), self.beta.exp(), self.centre))


def _g(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """g(x) = x + sum_k a_k tanh(b_k (x - c_k)) column-wise, (..., D), for units a, b, c (D, K)."""
    return x + (a * torch.tanh(b * (x.unsqueeze(-1) - c))).sum(-1)
