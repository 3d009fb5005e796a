"""Numeric precision of training: bf16 autocast for the networks, fp32 for every log-density.

`precision_gap` is the probe: the same rows and the same eps through the ELBO in fp32 and under
bf16 autocast, so that the cost of bf16 is a measured number rather than a guess.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from vae.config import Precision

if TYPE_CHECKING:  # vae.model imports this module (through vae.noise)
    from vae.model import VAE

Resolved = Literal["fp32", "bf16"]


def resolve_precision(precision: Precision, device: torch.device) -> Resolved:
    """auto: bf16 on CUDA (tensor cores), fp32 on CPU (bf16 is slower there without AMX)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: Resolved, cache: bool = True) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on the device, or nothing; cache=False inside CUDA graph capture."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Autocast off (a no-op when it is not on): densities, Cholesky factors and solves in fp32."""
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield


@dataclass(frozen=True)
class PrecisionGap:
    rows: int
    elbo_fp32: float  # mean ELBO of the rows, nats per row, original units
    elbo_bf16: float
    mean_abs_diff: float  # mean over rows of |ELBO_bf16 - ELBO_fp32|, nats
    max_abs_diff: float

    @property
    def diff(self) -> float:
        """Mean ELBO under bf16 minus fp32, nats per row."""
        return self.elbo_bf16 - self.elbo_fp32


@torch.no_grad()
def precision_gap(model: VAE, y: torch.Tensor, n_samples: int = 1, seed: int = 0) -> PrecisionGap:
    """ELBO of rows y (B, D, original units) in fp32 and under bf16 autocast, same eps, same device."""
    from vae.elbo import loss_terms  # vae.elbo imports this module

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x, mask = model.standardize(y.to(device, torch.float32))
    eps = torch.randn((n_samples, x.shape[0], model.latent_dim), generator=torch.Generator(device=device).manual_seed(seed),
                      device=device)
    elbo = {}
    names: tuple[Resolved, ...] = ("fp32", "bf16")
    for name in names:
        with autocast(device, name):
            elbo[name] = loss_terms(model, x, mask, n_samples, None, eps=eps if n_samples > 1 else eps[0]).elbo.double()
    model.train(was_training)
    diff = (elbo["bf16"] - elbo["fp32"]).abs()
    return PrecisionGap(x.shape[0], float(elbo["fp32"].mean()), float(elbo["bf16"].mean()), float(diff.mean()),
                        float(diff.max()) if diff.numel() else 0.0)
