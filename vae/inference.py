"""Batched inference: embeddings, reconstructions, new rows, traversals, anomaly thresholds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vae.draws import standard_normal
from vae.errors import ConfigError
from vae.model import VAE
from vae.transfer import HostSink, device_batches


@dataclass(frozen=True)
class Embedding:
    z: torch.Tensor  # (N, K) posterior means, or one draw from q(z|y) with mode="sample"
    logvar: torch.Tensor | None  # (N, K) with with_variance=True


def _device(model: VAE) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def embed(
    model: VAE,
    y: torch.Tensor,
    *,
    mode: Literal["mean", "sample"] = "mean",
    with_variance: bool = False,
    batch_rows: int = 4096,
    generator: torch.Generator | None = None,
) -> Embedding:
    """Encode rows (N, D) in original units, on the model's device; results on the CPU.

    On CUDA, rows on the host travel through pinned buffers, each batch's copy overlapping the
    previous batch's encoding, and results come back without a wait per batch (vae.transfer).
    """
    model.eval()
    device, n, k = _device(model), y.shape[0], model.latent_dim
    zs = HostSink(n, (k,), torch.float32, device)
    logvars = HostSink(n if with_variance else 0, (k,), torch.float32, device)
    for start, rows in device_batches(y, batch_rows, device):
        post = model.encode(*model.standardize(rows))
        z = post.mu
        if mode == "sample":
            eps = standard_normal(z.shape, generator, z.device)
            z = z + (0.5 * post.logvar).exp() * eps
        zs.put(start, z)
        if with_variance:
            logvars.put(start, post.logvar)
    return Embedding(zs.result(), logvars.result() if with_variance else None)


@torch.inference_mode()
def reconstruct(model: VAE, y: torch.Tensor, batch_rows: int = 4096) -> torch.Tensor:
    """E[y | z = posterior mean] in original units, (N, D)."""
    model.eval()
    parts = []
    for i in range(0, y.shape[0], batch_rows):
        post = model.encode(*model.standardize(y[i : i + batch_rows].to(_device(model), torch.float32)))
        parts.append(model.mean_of(model.decode(post.mu)).cpu())
    return torch.cat(parts) if parts else torch.empty(0, model.spec.n_features)


@torch.inference_mode()
def sample(
    model: VAE, n: int, *, generator: torch.Generator | None = None, batch_rows: int = 4096, noise: bool = True
) -> torch.Tensor:
    """n new rows from p(z) p(y|z) in original units; noise=False returns E[y|z] instead.

    generator: on any device; a CPU one gives the same rows whatever the model's device (vae.draws)."""
    model.eval()
    parts = []
    for i in range(0, n, batch_rows):
        m = min(batch_rows, n - i)
        z = standard_normal((m, model.latent_dim), generator, _device(model))
        out = model.decode(z)
        parts.append((model.sample_from(out, generator) if noise else model.mean_of(out)).cpu())
    return torch.cat(parts) if parts else torch.empty(0, model.spec.n_features)


@torch.inference_mode()
def traversals(model: VAE, steps: int = 7, radius: float = 2.5) -> torch.Tensor:
    """E[y|z] along each latent axis, other coordinates at 0: (K, steps, D) in original units."""
    model.eval()
    values = torch.linspace(-radius, radius, steps, device=_device(model))
    z = torch.zeros((model.latent_dim, steps, model.latent_dim), device=values.device)
    for j in range(model.latent_dim):
        z[j, :, j] = values
    return model.mean_of(model.decode(z)).cpu()


def anomaly_threshold(train_log_likelihood: torch.Tensor, quantile: float) -> float:
    """Rows whose log-likelihood falls below this quantile of the training rows are anomalies."""
    if not 0 < quantile < 1:
        raise ConfigError(f"embed.anomaly_quantile is {quantile!r}; it must be in (0, 1)")
    return float(torch.quantile(train_log_likelihood.detach().to("cpu", torch.float64), quantile))
