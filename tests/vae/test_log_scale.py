"""Log-scale columns (density with the Jacobian -log y) and sampling on the recorded grid."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import MultivariateNormal

import vae
from vae.init import init_linear_gaussian


def _lognormal(n: int = 800, seed: int = 0) -> torch.Tensor:
    """Two correlated log-normal columns (areas, in the hundreds) and one Gaussian far from 0."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.tensor([[0.6, 0.3], [0.0, 0.4]], dtype=torch.float64)
    normal = 100 + torch.randn(n, generator=g, dtype=torch.float64)
    return torch.stack([torch.exp(z[:, 0] + 6), torch.exp(z[:, 1] + 2), normal], 1).float()


def test_the_log_scale_start_is_the_full_gaussian_of_log_y_with_its_jacobian():
    y = _lognormal()
    spec = vae.describe_table(y, ["area", "width", "temp"], log_columns=["area", "width"])
    assert spec.log == (True, True, False)
    model = vae.VAE(spec, vae.ModelConfig(latent_dim=1, hidden_dims=(), noise_by_z=False), seed=0)
    init_linear_gaussian(model, y)
    t = y.double().clone()
    t[:, :2] = t[:, :2].log()
    closed = MultivariateNormal(t.mean(0), torch.cov(t.T, correction=0)).log_prob(t) - t[:, :2].sum(1)
    ev = vae.evaluate(model, y, iw_samples=20, seed=0)
    assert ev.log_likelihood == pytest.approx(float(closed.mean()), abs=2e-3)
    # on log-normal data the log scale is far better than the full Gaussian of y itself
    raw = y.double()
    plain = MultivariateNormal(raw.mean(0), torch.cov(raw.T, correction=0)).log_prob(raw)
    assert float(closed.mean()) > float(plain.mean()) + 0.3


def test_auto_takes_the_log_of_skewed_positive_columns_only():
    y = _lognormal(1500)
    spec = vae.describe_table(y, ["area", "width", "temp"], log_columns="auto")
    assert spec.log == (True, True, False)  # temp is positive too, but symmetric
    assert vae.describe_table(y, log_columns="none").log == ()


def test_log_scale_samples_stay_positive():
    y = _lognormal()
    spec = vae.describe_table(y, ["area", "width", "temp"], log_columns="auto")
    model = vae.VAE(spec, vae.ModelConfig(latent_dim=1, hidden_dims=(), noise_by_z=False), seed=0)
    init_linear_gaussian(model, y)
    draws = vae.sample(model, 20000, generator=torch.Generator().manual_seed(0))
    assert bool((draws[:, :2] > 0).all())
    # the draws follow log-normal medians: exp(mean of log y)
    assert float(draws[:, 0].median()) == pytest.approx(float(y[:, 0].log().mean().exp()), rel=0.05)


def test_a_non_positive_value_in_a_log_column_is_named():
    y = _lognormal(50)
    spec = vae.describe_table(y, ["area", "width", "temp"], log_columns=["area"])
    bad = y.clone()
    bad[4, 0] = -3.0
    with pytest.raises(vae.DataError, match=r"column 'area' row 4 holds -3.0; the model takes its log"):
        vae.check_log_domain(bad, spec)
    with pytest.raises(vae.DataError, match=r"column 'area' row 4 holds -3.0; model.log_columns needs values > 0"):
        vae.describe_table(bad, ["area", "width", "temp"], log_columns=["area"])


def test_grid_columns_are_sampled_on_their_grid():
    g = torch.Generator().manual_seed(0)
    n = 400
    year = torch.where(torch.rand(n, generator=g) < 0.5, 1999.0, 2008.0)
    cyl = torch.tensor([4.0, 5.0, 6.0, 8.0])[torch.randint(0, 4, (n,), generator=g)]
    hwy = (torch.randn(n, generator=g) * 6 + 24).round().clamp(12, 44)  # integers, many values
    hwy[:2] = torch.tensor([12.0, 44.0])
    hwy = hwy + torch.arange(n) % 60 * 0.0  # still integers
    noise = torch.randn(n, generator=g)  # continuous
    y = torch.stack([year, cyl, hwy * 1.0 + (torch.arange(n) % 7 == 0) * 0.0, noise], 1)
    y[:70, 2] = torch.arange(70.0) % 33 + 12  # enough distinct integers that a lattice, not a list, is kept
    spec = vae.describe_table(y, ["year", "cyl", "hwy", "noise"])
    assert spec.support[0] == (1999.0, 2008.0) and spec.support[1] == (4.0, 5.0, 6.0, 8.0)
    model = vae.VAE(spec, vae.ModelConfig(latent_dim=2, hidden_dims=(), noise_by_z=False), seed=0)
    init_linear_gaussian(model, y)
    free = vae.sample(model, 5000, generator=torch.Generator().manual_seed(1))
    assert not set(free[:, 0].tolist()) <= {1999.0, 2008.0}  # the Gaussian alone leaves the grid
    draws = vae.sample(model, 5000, generator=torch.Generator().manual_seed(1), on_grid=True)
    assert set(draws[:, 0].tolist()) == {1999.0, 2008.0}
    assert set(draws[:, 1].tolist()) <= {4.0, 5.0, 6.0, 8.0}
    assert bool((draws[:, 2] == draws[:, 2].round()).all())
    assert float(draws[:, 2].min()) >= 12 and float(draws[:, 2].max()) <= 44
    assert torch.equal(draws[:, 3], free[:, 3])  # continuous columns untouched
    again = vae.TableSpec.from_dict(spec.to_dict())
    assert again.support == spec.support and again.lattice == spec.lattice
