"""The bf16 probe: the same rows and the same eps through the ELBO in fp32 and under bf16 autocast,
so that the cost of bf16 is a measured number rather than a guess."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vae.elbo import loss_terms
from vae.model import VAE
from vae.precision import Resolved, autocast


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
