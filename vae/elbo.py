"""The evidence lower bound (Kingma & Welling 2014) and its pieces, per row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vae.draws import standard_normal
from vae.model import VAE, Posterior
from vae.precision import full_precision


@dataclass(frozen=True)
class LossTerms:
    recon: torch.Tensor  # (B,) (1/M) sum_m log p(y|z_m), nats in original units
    kl: torch.Tensor  # (B,) KL(q(z|y) || N(0, I)): analytic, or its one-sample estimate (sampled_kl)

    @property
    def elbo(self) -> torch.Tensor:
        return self.recon - self.kl


def kl_per_dim(post: Posterior) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per latent dimension, (B, K)."""
    return 0.5 * (post.mu.pow(2) + post.logvar.exp() - post.logvar - 1.0)


def reparameterize(
    post: Posterior, n_samples: int | None, generator: torch.Generator | None, eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I); (M, B, K), or (B, K) for n_samples None.

    eps: the standard-normal draws, given (same shape as the result) or drawn from generator.
    """
    if eps is None:
        shape = post.mu.shape if n_samples is None else (n_samples, *post.mu.shape)
        eps = standard_normal(shape, generator, post.mu.device, post.mu.dtype)
    return post.mu + (0.5 * post.logvar).exp() * eps


def loss_terms(
    model: VAE,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    n_samples: int,
    generator: torch.Generator | None,
    eps: torch.Tensor | None = None,
    *,
    sampled_kl: bool = False,
) -> LossTerms:
    """Reconstruction and KL terms of the ELBO for standardized rows x (B, D).

    eps: (B, K) for n_samples 1, else (M, B, K); drawn from generator when None. Under bf16
    autocast the networks run in bf16; their outputs, the densities and the KL are fp32.
    sampled_kl: the KL term as log q(z|y) - log p(z) at the drawn z (from eps: no cancellation)
    instead of analytic. The expectation is the same; the ELBO estimate is then the mean log
    importance weight, which has no Monte Carlo noise at all where q is the exact posterior
    (the linear-Gaussian start) and less near it: for comparing candidates on validation rows.
    """
    post, eps, z, recon = _decoded_draws(model, x, mask, n_samples, generator, eps)
    kl = _sampled_kl(post, eps, z) if sampled_kl else kl_per_dim(post).sum(-1)
    if n_samples > 1:
        recon = recon.mean(0)  # (M, B) -> (B,)
        kl = kl.mean(0) if sampled_kl else kl
    return LossTerms(recon=recon, kl=kl)


def log_weights(model: VAE, x: torch.Tensor, mask: torch.Tensor | None, n_samples: int,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y|z_m) and log q(z_m|y) - log p(z_m) at n_samples draws z_m ~ q(z|y) a row, (M, B)
    each: the log importance weight log w_m is their difference. Their means over the draws are
    loss_terms' with the KL sampled (the ELBO as the mean log weight); log (1/M) sum_m w_m is the
    IWAE_M bound (Burda et al. 2016), which rises with M towards log p(y) and equals it at any M
    where q is the exact posterior (the linear-Gaussian start)."""
    post, eps, z, recon = _decoded_draws(model, x, mask, n_samples, generator, None)
    kl = _sampled_kl(post, eps, z)
    return (recon, kl) if n_samples > 1 else (recon.unsqueeze(0), kl.unsqueeze(0))


def _decoded_draws(
    model: VAE, x: torch.Tensor, mask: torch.Tensor | None, n_samples: int, generator: torch.Generator | None,
    eps: torch.Tensor | None,
) -> tuple[Posterior, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q(z|y), the draws eps and z = mu + sigma * eps, and log p(y|z) summed over the columns (fp32)."""
    post = model.encode(x, mask)
    if eps is None:
        shape = post.mu.shape if n_samples == 1 else (n_samples, *post.mu.shape)
        eps = standard_normal(shape, generator, post.mu.device, post.mu.dtype)
    # n_samples 1: (B, K) plain 2-D matmuls, measurably faster on CPU than a (1, B, K) batch
    z = reparameterize(post, None, None, eps)  # (B, K) or (M, B, K)
    out = model.decode(z)
    if torch.is_autocast_enabled(x.device.type):
        with full_precision(x.device.type):
            recon = model.log_px_z(x, out, mask).sum(-1)
    else:
        recon = model.log_px_z(x, out, mask).sum(-1)
    return post, eps, z, recon


def _sampled_kl(post: Posterior, eps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log q(z|y) - log p(z) at z = mu + sigma * eps: 1/2 sum_j (z_j^2 - eps_j^2 - logvar_j) (the 2 pi
    terms cancel; from eps, so no cancellation in z - mu)."""
    return 0.5 * (z.float().pow(2) - eps.float().pow(2) - post.logvar.float()).sum(-1)


def kl_weight(step: int, beta: float, warmup_steps: int) -> float:
    """beta_t: a linear ramp from 0 to beta over warmup_steps optimizer steps, then beta."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)
