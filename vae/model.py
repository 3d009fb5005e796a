"""The Gaussian VAE: an MLP (or affine) encoder q(z|y) and a Gaussian/Bernoulli decoder p(y|z)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from vae.config import ModelConfig
from vae.table import TableSpec

_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "elu": nn.ELU}
LOG_2PI = math.log(2 * math.pi)


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers with an activation between them, none after the last (affine if 2 sizes)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i > 0:
            layers.append(_ACTIVATIONS[activation]())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class Posterior:
    mu: torch.Tensor  # (B, K)
    logvar: torch.Tensor  # (B, K)


@dataclass(frozen=True)
class DecoderOut:
    loc: torch.Tensor  # (..., D) Gaussian means (standardized scale) or Bernoulli logits
    sigma: torch.Tensor  # (..., D) or broadcastable (D,) / (1,): Gaussian std, standardized scale


class Encoder(nn.Module):
    def __init__(self, n_in: int, hidden: tuple[int, ...], latent_dim: int, activation: str):
        super().__init__()
        self.net = mlp([n_in, *hidden, 2 * latent_dim], activation)

    def forward(self, x: torch.Tensor) -> Posterior:
        mu, logvar = self.net(x).float().chunk(2, dim=-1)
        return Posterior(mu, logvar)


class Decoder(nn.Module):
    fixed_sigma: torch.Tensor

    def __init__(self, n_out: int, config: ModelConfig):
        super().__init__()
        self.mode = config.decoder_variance
        self.min_sigma = config.min_sigma
        hetero = self.mode == "heteroscedastic"
        self.net = mlp([config.latent_dim, *config.hidden_dims, n_out * (2 if hetero else 1)], config.activation)
        n_sigma = {"shared": 1, "per_feature": n_out}.get(self.mode, 0)
        # softplus(raw) + min_sigma = 1 at start: unit variance on the standardized scale
        start = math.log(math.expm1(max(1.0 - self.min_sigma, 1e-6)))
        self.raw_sigma = nn.Parameter(torch.full((n_sigma,), start)) if n_sigma else None
        self.register_buffer("fixed_sigma", torch.tensor([config.fixed_sigma]), persistent=False)

    def forward(self, z: torch.Tensor) -> DecoderOut:
        out = self.net(z).float()
        if self.mode == "heteroscedastic":
            loc, raw = out.chunk(2, dim=-1)
            return DecoderOut(loc, F.softplus(raw) + self.min_sigma)
        if self.raw_sigma is None:
            return DecoderOut(out, self.fixed_sigma)
        return DecoderOut(out, F.softplus(self.raw_sigma) + self.min_sigma)


class VAE(nn.Module):
    """Takes rows in the table's original units; scaling, masks and the Jacobian stay inside."""

    loc: torch.Tensor  # (D,) buffers, saved in the state_dict
    scale: torch.Tensor
    gaussian: torch.Tensor
    cell_const: torch.Tensor

    def __init__(self, spec: TableSpec, config: ModelConfig, seed: int | None = None):
        """seed: initial weights from this seed (the global RNG is left untouched); None: global RNG."""
        super().__init__()
        self.spec, self.config = spec, config
        d = spec.n_features
        self.masked = spec.missing == "mask"
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.encoder = Encoder(d * (2 if self.masked else 1), config.hidden_dims, config.latent_dim, config.activation)
            self.decoder = Decoder(d, config)
        gauss = torch.tensor([k == "gaussian" for k in spec.kinds])
        scale = torch.tensor(spec.scale, dtype=torch.float32)
        self.all_gaussian, self.all_bernoulli = bool(gauss.all()), not bool(gauss.any())
        self.register_buffer("loc", torch.tensor(spec.loc, dtype=torch.float32))
        self.register_buffer("scale", scale)
        self.register_buffer("gaussian", gauss)
        # per-cell constant of log N in original units: -1/2 log 2pi - log s_j (change of variables)
        self.register_buffer("cell_const", torch.where(gauss, -0.5 * LOG_2PI - scale.log(), 0.0))

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def standardize(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, D) original units -> (scaled rows with missing cells at 0, observed mask or None)."""
        x = (y - self.loc) / self.scale
        if not self.masked:
            return x, None
        mask = ~torch.isnan(x)
        return torch.where(mask, x, 0.0), mask.to(x.dtype)

    def unstandardize(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.gaussian, x * self.scale + self.loc, x)

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None) -> Posterior:
        return self.encoder(x if mask is None else torch.cat([x, mask], dim=-1))

    def decode(self, z: torch.Tensor) -> DecoderOut:
        return self.decoder(z)

    def log_px_z(self, x: torch.Tensor, out: DecoderOut, mask: torch.Tensor | None) -> torch.Tensor:
        """Per-cell log p(y|z) in original units, (..., D); unobserved cells give 0."""
        if self.all_bernoulli:
            cell = x * out.loc - F.softplus(out.loc)
        else:
            # log N(x; m, s^2) = -1/2 (x - m)^2 / s^2 - log s - 1/2 log 2pi (constant in cell_const)
            cell = -0.5 * ((x - out.loc) / out.sigma) ** 2 - out.sigma.log() + self.cell_const
            if not self.all_gaussian:
                cell = torch.where(self.gaussian, cell, x * out.loc - F.softplus(out.loc))
        return cell if mask is None else cell * mask

    def mean_of(self, out: DecoderOut) -> torch.Tensor:
        """E[y|z] in original units: the Gaussian mean, or the Bernoulli probability."""
        probs = torch.sigmoid(out.loc)
        x = out.loc if self.all_gaussian else torch.where(self.gaussian, out.loc, probs)
        return self.unstandardize(x)

    def sample_from(self, out: DecoderOut, generator: torch.Generator | None) -> torch.Tensor:
        """A draw y ~ p(y|z) in original units."""
        noise = torch.randn(out.loc.shape, generator=generator, device=out.loc.device)
        gauss = out.loc + out.sigma * noise
        if self.all_gaussian:
            return self.unstandardize(gauss)
        u = torch.rand(out.loc.shape, generator=generator, device=out.loc.device)
        flips = (u < torch.sigmoid(out.loc)).to(gauss.dtype)
        return self.unstandardize(torch.where(self.gaussian, gauss, flips))
