"""Closed forms the tests compare against: probabilistic PCA (Tipping & Bishop 1999)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import MultivariateNormal


@dataclass(frozen=True)
class PPCA:
    mean: torch.Tensor  # (D,)
    w: torch.Tensor  # (D, k)
    sigma2: torch.Tensor  # ()

    @property
    def cov(self) -> torch.Tensor:
        return self.w @ self.w.T + self.sigma2 * torch.eye(self.w.shape[0], dtype=self.w.dtype)

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """Exact log N(y; mean, W W^T + sigma^2 I) per row, (N,)."""
        return MultivariateNormal(self.mean, self.cov).log_prob(y.double())

    def posterior_mean_reconstruction(self, y: torch.Tensor) -> torch.Tensor:
        """W E[z|y] + mean, with E[z|y] = M^{-1} W^T (y - mean), M = W^T W + sigma^2 I."""
        m = self.w.T @ self.w + self.sigma2 * torch.eye(self.w.shape[1], dtype=self.w.dtype)
        ez = torch.linalg.solve(m, self.w.T @ (y.double() - self.mean).T).T  # (N, k)
        return ez @ self.w.T + self.mean


def ppca_mle(y: torch.Tensor, k: int) -> PPCA:
    """Maximum-likelihood pPCA: eigen-decomposition of the (1/N) sample covariance."""
    y = y.double()
    mean = y.mean(0)
    centered = y - mean
    cov = centered.T @ centered / y.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)  # descending
    sigma2 = evals[k:].mean()  # mean of the discarded eigenvalues
    w = evecs[:, :k] * (evals[:k] - sigma2).sqrt()  # U_k (L_k - sigma^2 I)^{1/2}
    return PPCA(mean, w, sigma2)


@dataclass(frozen=True)
class Scaling:
    loc: torch.Tensor  # (D,)
    scale: torch.Tensor  # (D,) population std of the training table

    @classmethod
    def of(cls, y: torch.Tensor, standardize: bool) -> Scaling:
        y = y.double()
        if not standardize:
            return cls(torch.zeros(y.shape[1], dtype=y.dtype), torch.ones(y.shape[1], dtype=y.dtype))
        return cls(y.mean(0), y.std(0, unbiased=False))

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return (y.double() - self.loc) / self.scale

    @property
    def log_jacobian(self) -> torch.Tensor:
        """-sum_j log s_j: the density of y from the density of (y - m) / s."""
        return -self.scale.log().sum()


def ppca_heldout_loglik(train: torch.Tensor, test: torch.Tensor, k: int, standardize: bool) -> float:
    """Mean held-out log-likelihood (nats/row, original units) of the pPCA MLE of train.

    With standardization the MLE is that of the standardized training table, so its variance is
    shared on the standardized scale; the Jacobian brings the density back to original units.
    """
    scaling = Scaling.of(train, standardize)
    fitted = ppca_mle(scaling(train), k)
    return float(fitted.log_prob(scaling(test)).mean() + scaling.log_jacobian)


@dataclass(frozen=True)
class Gaussian:
    mean: torch.Tensor  # (D,)
    cov: torch.Tensor  # (D, D)
    noise: torch.Tensor  # (D, D) the part of cov that is decoder noise

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        return MultivariateNormal(self.mean, self.cov).log_prob(y.double())


def affine_vae_marginal(model: torch.nn.Module) -> Gaussian:
    """The exact p(y), original units, of an affine Gaussian VAE (hidden_dims []).

    On the model's standardized scale x = (y - loc) / scale, x = C z + v + noise with
    noise ~ N(0, Psi) (diagonal, or L L^T for full/lowrank): p(x) = N(v, C C^T + Psi).
    """
    d = model.spec.n_features
    assert not (model.decoder.by_z and float(model.decoder.noise_gate)), "noise scaled by z: not Gaussian"
    linear = model.decoder.net[0]
    c, v = linear.weight.detach().double()[:d], linear.bias.detach().double()[:d]
    with torch.no_grad():
        out = model.decode(torch.zeros(1, model.latent_dim))
    if out.scale_tril is not None:
        psi = (out.scale_tril @ out.scale_tril.T).double()
    else:
        psi = torch.diag(out.sigma.detach().double().reshape(-1).expand(d) ** 2)
    s, loc = model.scale.double(), model.loc.double()
    noise = s[:, None] * psi * s[None, :]
    return Gaussian(loc + s * v, s[:, None] * (c @ c.T) * s[None, :] + noise, noise)


def affine_vae_loglik(model: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Exact log p(y) per row, original units, of an affine Gaussian VAE's decoder."""
    return affine_vae_marginal(model).log_prob(y)
