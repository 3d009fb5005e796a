"""Shared, expensive fixtures of tests/vae: affine VAEs trained once on pPCA tables."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from filelock import FileLock

import vae

PPCA_D, PPCA_K = 10, 2


@dataclass(frozen=True)
class PPCAFit:
    model: vae.VAE
    train: torch.Tensor  # (4000, D) float32, original units
    test: torch.Tensor  # (2000, D) held-out rows
    k: int
    standardize: bool


def ppca_rows(n: int, w: torch.Tensor, mean: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    """n rows of y = W z + mean + noise * eps, z ~ N(0, I_k), float64."""
    z = torch.randn(n, w.shape[1], generator=gen, dtype=torch.float64)
    eps = torch.randn(n, w.shape[0], generator=gen, dtype=torch.float64)
    return z @ w.T + mean + noise * eps


def _fit_ppca(standardize: bool, scales: torch.Tensor | None = None, lr: float = 3e-3) -> PPCAFit:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    # (a) moderate units, no scaling; (b) units that differ by five orders of magnitude
    if scales is None:
        scales = torch.logspace(-2, 3, PPCA_D, dtype=torch.float64) if standardize else torch.full((PPCA_D,), 2.0, dtype=torch.float64)
    w = torch.randn(PPCA_D, PPCA_K, generator=gen, dtype=torch.float64)
    mean = torch.randn(PPCA_D, generator=gen, dtype=torch.float64)
    y = (ppca_rows(6000, w, mean, 0.3, gen) * scales).float()
    train, test = y[:4000], y[4000:]
    spec = vae.describe_table(train, likelihood="gaussian", standardize=standardize)
    config = vae.ModelConfig(latent_dim=PPCA_K, hidden_dims=(), decoder_variance="shared", likelihood="gaussian")
    torch.manual_seed(0)
    model = vae.VAE(spec, config)
    # all rows train (no early stopping): the result is the MLE of the same rows as the closed
    # form; from a random start, so that the test is of the training, not of the linear start
    cfg = vae.TrainConfig(epochs=300, lr=lr, batch_size=256, val_fraction=0.0, device="cpu", num_threads=1,
                          init="random")
    vae.fit(model, train, cfg)
    return PPCAFit(model, train, test, PPCA_K, standardize)


def _once(tmp_path_factory: pytest.TempPathFactory, name: str, fit: Callable[[], PPCAFit]) -> PPCAFit:
    """fit() once per test session, pytest-xdist's workers included (test_ppca.py and
    test_inference.py may run on two): the first worker to need it fits and saves it, another loads
    that file. The fit is deterministic (seeds, one thread): whichever worker makes it, it is the same."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return fit()
    torch.set_num_threads(1)  # as fit() leaves this process, whichever worker fits
    path = tmp_path_factory.getbasetemp().parent / f"{name}.pt"  # the session's folder, shared by its workers
    with FileLock(f"{path}.lock"):
        if path.exists():
            return torch.load(path, weights_only=False)
        made = fit()
        torch.save(made, path)
        return made


@pytest.fixture(scope="session")
def ppca_plain(tmp_path_factory: pytest.TempPathFactory) -> PPCAFit:
    """Affine shared-variance VAE on a pPCA table of moderate scale, no standardization."""
    return _once(tmp_path_factory, "ppca_plain", lambda: _fit_ppca(standardize=False))


@pytest.fixture(scope="session")
def ppca_scaled(tmp_path_factory: pytest.TempPathFactory) -> PPCAFit:
    """The same model on columns whose units differ by orders of magnitude, standardized."""
    return _once(tmp_path_factory, "ppca_scaled", lambda: _fit_ppca(standardize=True))


@pytest.fixture(scope="session")
def ppca_raw_wide() -> PPCAFit:
    """Units from 1e-2 to 1e3 and no standardization: the noise is learned in the table's units."""
    # the noise moves over orders of magnitude from its start: measured -46.367 vs -46.351 at lr 1e-2
    return _fit_ppca(standardize=False, scales=torch.logspace(-2, 3, PPCA_D, dtype=torch.float64), lr=1e-2)
