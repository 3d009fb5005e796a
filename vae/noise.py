"""Correlated decoder noise: one covariance over the Gaussian columns, shared over z.

`full`: Sigma = L L^T with L lower-triangular (positive diagonal, each L_jj floored: model.min_sigma
or the column's recording resolution, see vae.model.resolution_floor).
`lowrank`: Sigma = diag(d^2) + W W^T with W of rank noise_rank; factored by Cholesky too, so that
both give per-cell factors by the chain rule. With an affine decoder these contain the
full-covariance Gaussian and factor analysis.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vae.precision import full_precision


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """raw with softplus(raw) = x, for x > 0 (stable for large x)."""
    return x + torch.log(-torch.expm1(-x))


class NoiseCovariance(nn.Module):
    floor: torch.Tensor

    def __init__(self, n: int, mode: str, rank: int, floor: torch.Tensor):
        """floor (n,): the least conditional std L_jj of each column, in the parameters' units."""
        super().__init__()
        self.mode = mode
        self.register_buffer("floor", floor.float(), persistent=False)
        start = (1.0 - floor.double()).clamp_min(1e-6).expm1().log().float()  # unit variance at start
        self.raw_diag = nn.Parameter(start)
        if mode == "full":
            self.lower = nn.Parameter(torch.zeros(n, n))  # its strictly lower triangle is used
        else:  # a zero factor would get no gradient: start small and random
            self.factor = nn.Parameter(0.01 * torch.randn(n, rank))

    def diag(self) -> torch.Tensor:
        return F.softplus(self.raw_diag) + self.floor

    def cholesky(self) -> torch.Tensor:
        """L (n, n), lower-triangular, with L L^T the noise covariance (likelihood units); fp32
        under autocast, and NaN rather than an error when it fails (no device sync: see train)."""
        with full_precision(self.raw_diag.device.type):
            if self.mode == "full":
                return torch.tril(self.lower, -1) + torch.diag(self.diag())
            cov = torch.diag(self.diag().pow(2)) + self.factor @ self.factor.T
            return nan_if_failed(*torch.linalg.cholesky_ex(cov))

    @torch.no_grad()
    def set_covariance(self, cov: torch.Tensor, factor: torch.Tensor | None = None) -> None:
        """full: Sigma = cov; lowrank: Sigma = diag(cov) + factor factor^T (cov diagonal).

        Computed on the CPU in float64 whatever the device of cov and of the parameters; the
        results are moved to the parameters' device and dtype."""
        if self.mode == "full":
            tril = torch.linalg.cholesky(cov.detach().to("cpu", torch.float64))
            self.lower.copy_(torch.tril(tril, -1).to(self.lower))
            diag = tril.diagonal()
        else:
            assert factor is not None
            self.factor.copy_(factor.detach().to(self.factor))
            diag = cov.detach().to("cpu", torch.float64).diagonal().sqrt()
        floor = self.floor.to("cpu", torch.float64)  # (n,) a buffer on the parameters' device
        self.raw_diag.copy_(inverse_softplus((diag - floor).clamp_min(1e-3 * floor)).to(self.raw_diag))


def nan_if_failed(tril: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """A Cholesky factor from cholesky_ex, NaN where the factorization failed (info > 0), so that a
    failure reaches the loss as a non-finite value without the host reading info."""
    bad = torch.where(info > 0, torch.nan, 0.0).to(tril.dtype)  # (...,)
    return tril + bad[..., None, None]


def gaussian_cells(resid: torch.Tensor, tril: torch.Tensor, mask: torch.Tensor | None,
                   log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Chain-rule factors of log N(r; 0, D L L^T D) without the -1/2 log 2pi, (..., G).

    D = diag(exp(log_scale)) per row, or I: N(r; 0, D S D) = N(D^{-1} r; 0, S) / det D, and the
    observed block of D S D is D_o S_oo D_o, so a mask works the same on the scaled residual.

    u = L^{-1} r by a triangular solve; cell_j = -u_j^2 / 2 - log L_jj, summing to the joint.
    With a mask (B, G) each row uses the Cholesky factor of its observed block, embedded as
    M Sigma M + (I - M) (missing cells then give 0): the marginal of the observed cells.
    """
    if log_scale is not None:
        return gaussian_cells(resid * (-log_scale).exp(), tril, mask) - log_scale
    if mask is None:
        u = torch.linalg.solve_triangular(tril.T, resid, upper=True, left=False)
        return -0.5 * u.pow(2) - tril.diagonal().log()
    cov = tril @ tril.T
    rows = cov * (mask.unsqueeze(-1) * mask.unsqueeze(-2)) + torch.diag_embed(1 - mask)  # (B, G, G)
    tril_b = nan_if_failed(*torch.linalg.cholesky_ex(rows))
    u = torch.linalg.solve_triangular(tril_b.mT, (resid * mask).unsqueeze(-2), upper=True, left=False)
    return -0.5 * u.squeeze(-2).pow(2) - tril_b.diagonal(dim1=-2, dim2=-1).log()
