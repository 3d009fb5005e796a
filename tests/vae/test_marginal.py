"""model.marginal_units: a learned monotone map of each real column before its Gaussian.

Checked against what a change of variables must give: g strictly increasing with the derivative
autograd finds, its inverse exact, p(y|z) a density in the table's units (it integrates to 1),
draws that follow it, and a model that still saves, loads and trains like any other.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

import vae
from vae.init import init_linear_gaussian
from vae.marginal import MarginalTransform


def _bent(columns: int, units: int, seed: int = 0) -> MarginalTransform:
    """A transform far from the identity: sizeable, steep and shifted units (float64)."""
    g = torch.Generator().manual_seed(seed)
    t = MarginalTransform(columns, units).double()
    with torch.no_grad():
        t.alpha.copy_(torch.randn(columns, units, generator=g, dtype=torch.float64))
        t.beta.copy_(torch.randn(columns, units, generator=g, dtype=torch.float64))
        t.centre.copy_(2 * torch.randn(columns, units, generator=g, dtype=torch.float64))
    return t


def test_the_map_is_increasing_its_log_derivative_exact_and_its_inverse_exact():
    t = _bent(3, 5)
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64).unsqueeze(1).repeat(1, 3).requires_grad_(True)
    g, log_dg = t(x)
    assert bool((g[1:] > g[:-1]).all())  # strictly increasing in every column
    (slope,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(log_dg, slope.log(), rtol=0, atol=1e-12)
    assert bool((log_dg >= 0).all())  # g' >= 1
    torch.testing.assert_close(t.inverse(g.detach()), x.detach(), rtol=0, atol=1e-9)


def test_the_map_starts_near_the_identity():
    t = MarginalTransform(4, 8)
    x = torch.linspace(-4, 4, 101).unsqueeze(1).repeat(1, 4)
    with torch.no_grad():
        g, log_dg = t(x)
    assert float((g - x).abs().max()) < 0.06 and float(log_dg.max()) < 0.15


def _table(n: int = 600, seed: int = 0) -> torch.Tensor:
    """Two bounded, skewed columns (a Beta and a squared uniform) and a Gaussian in other units."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    beta = torch.distributions.Beta(torch.tensor(0.5, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64))
    b = beta.sample((n,))
    return torch.stack([10 * b + u[:, 0], u[:, 1] ** 2, 50 + 3 * torch.randn(n, generator=g, dtype=torch.float64)], 1).float()


def _model(y: torch.Tensor, units: int = 4, hidden: tuple[int, ...] = (16,)) -> vae.VAE:
    spec = vae.describe_table(y, ["a", "b", "c"], log_columns="none")
    model = vae.VAE(spec, vae.ModelConfig(latent_dim=2, hidden_dims=hidden, marginal_units=units,
                                          noise_by_z=False), seed=0)
    init_linear_gaussian(model, y)
    bent = _bent(3, units, seed=1)
    with torch.no_grad():  # far from the identity, so that the change of variables matters
        for name in ("alpha", "beta", "centre"):
            getattr(model.marginal, name).copy_(getattr(bent, name).float())
    return model.eval()


def test_the_start_is_the_full_gaussian_of_g_x_with_its_jacobian():
    """Closed form: an affine model whose map is bent starts at the full Gaussian of t = g(x)
    (x the standardized cells), and the density of y is that Gaussian's times g'(x) / scale; the
    encoder sees g(x), so its posterior is exact and IWAE(20) equals the closed form."""
    y = _table()
    spec = vae.describe_table(y, ["a", "b", "c"], log_columns="none")
    model = vae.VAE(spec, vae.ModelConfig(latent_dim=1, hidden_dims=(), marginal_units=3, noise_by_z=False), seed=0)
    bent = _bent(3, 3, seed=4)
    with torch.no_grad():
        for name in ("alpha", "beta", "centre"):
            getattr(model.marginal, name).copy_(getattr(bent, name).float())
    init_linear_gaussian(model, y)
    x = (y.double() - model.loc.double()) / model.scale.double()
    with torch.no_grad():
        t, log_dg = bent(x)
    closed = (MultivariateNormal(t.mean(0), torch.cov(t.T, correction=0)).log_prob(t) + log_dg.sum(1)
              - model.scale.double().log().sum())
    ev = vae.evaluate(model, y, iw_samples=20, seed=0)
    assert ev.log_likelihood == pytest.approx(float(closed.mean()), abs=2e-3)
    plain = MultivariateNormal(y.double().mean(0), torch.cov(y.double().T, correction=0)).log_prob(y.double())
    assert float(closed.mean()) != pytest.approx(float(plain.mean()), abs=0.05)  # the map matters here


def test_every_columns_factor_integrates_to_one():
    """With the columns in table order the chain rule's factor of column j depends on y_j and
    the earlier columns only; each factor, with the earlier columns fixed, integrates to 1."""
    y = _table()
    model = _model(y)
    z = torch.tensor([[0.3, -0.7]])
    with torch.no_grad():
        out = model.decode(z)
        for column in range(3):
            lo, hi = float(y[:, column].min()), float(y[:, column].max())
            width = hi - lo
            grid = torch.linspace(lo - 3 * width, hi + 3 * width, 200001, dtype=torch.float64)
            rows = y[:1].repeat(grid.shape[0], 1)
            rows[:, column] = grid.float()
            x, _ = model.standardize(rows)
            factor = model.log_px_z(x, out, None).double()[:, column]
            assert float(torch.trapezoid(factor.exp(), grid)) == pytest.approx(1.0, abs=1e-4), column


def test_draws_follow_the_density_and_the_mean_maps_to_the_median():
    """y_0's factor is its whole conditional p(y_0 | z): draws of sample_from (through g's
    inverse) have its distribution function (Kolmogorov-Smirnov distance of 20,000 draws)."""
    y = _table()
    model = _model(y)
    with torch.no_grad():
        out = model.decode(torch.tensor([[0.3, -0.7]]).repeat(20000, 1))
        draws = model.sample_from(out, torch.Generator().manual_seed(0))[:, 0].double().sort().values
        lo, hi = float(y[:, 0].min()), float(y[:, 0].max())
        grid = torch.linspace(lo - 3 * (hi - lo), hi + 3 * (hi - lo), 200001, dtype=torch.float64)
        rows = y[:1].repeat(grid.shape[0], 1)
        rows[:, 0] = grid.float()
        x, _ = model.standardize(rows)
        density = model.log_px_z(x, model.decode(torch.tensor([[0.3, -0.7]])), None).double()[:, 0].exp()
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(density, grid)])
    at_draws = torch.from_numpy(np.interp(draws.numpy(), grid.numpy(), cdf.numpy()))
    empirical = torch.arange(1, draws.shape[0] + 1, dtype=torch.float64) / draws.shape[0]
    assert float((at_draws - empirical).abs().max()) < 0.015
    # the decoder's Gaussian mean maps to the column's conditional median
    with torch.no_grad():
        median = float(model.mean_of(model.decode(torch.tensor([[0.3, -0.7]])))[0, 0])
    assert median == pytest.approx(float(np.interp(0.5, cdf.numpy(), grid.numpy())), abs=1e-3 * (hi - lo))


def test_a_model_with_the_map_trains_saves_and_loads(tmp_path):
    """Its parameters train with the rest (the map moves off its start), the held-out figure is
    at least the full Gaussian's, and the saved model scores the same rows the same."""
    y, held = _table(800, seed=2), _table(400, seed=3)
    spec = vae.describe_table(y, ["a", "b", "c"], log_columns="none")
    model = vae.VAE(spec, vae.ModelConfig(latent_dim=2, hidden_dims=(32, 32), marginal_units=4), seed=0)
    start = {k: v.clone() for k, v in model.marginal.state_dict().items()}
    cfg = vae.TrainConfig(epochs=60, batch_size=64, refit=False, seed=0, num_threads=1)
    result = vae.fit(model, y, cfg)
    assert any(not torch.equal(start[k], v) for k, v in model.marginal.state_dict().items())
    scored = vae.evaluate(model, held, iw_samples=50)
    t = y.double()
    full = MultivariateNormal(t.mean(0), torch.cov(t.T, correction=0)).log_prob(held.double()).mean()
    assert math.isfinite(scored.log_likelihood) and scored.log_likelihood > float(full) + 0.3
    vae.save_model(tmp_path, model, cfg, result.history)
    loaded = vae.load_model(tmp_path)
    assert loaded.config.marginal_units == 4 and loaded.marginal is not None
    assert vae.evaluate(loaded, held, iw_samples=20) == vae.evaluate(model, held, iw_samples=20)


def test_embedding_encodes_the_mapped_cells():
    """vae.embed (the streaming path of `vaepipe embed`) gives model.encode's posterior means,
    which see g(x): the same numbers as encoding the mapped cells by hand."""
    y = _table()
    model = _model(y)
    with torch.no_grad():
        x, _ = model.standardize(y)
        mapped = torch.where(model.gaussian, model.marginal(x)[0], x)
        by_hand = model.encoder(mapped).mu
    torch.testing.assert_close(vae.embed(model, y).z, by_hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model.encoder(x).mu, by_hand, atol=1e-3)  # the map changes the means
