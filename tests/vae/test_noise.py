"""Correlated decoder noise (`full`, `lowrank`) against torch's MultivariateNormal."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, MultivariateNormal

import vae
from tests.vae.closed_form import affine_vae_marginal


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _table(n: int = 48, binary: bool = False) -> torch.Tensor:
    """Correlated columns in units from 0.01 to 1000, optionally with two binary columns."""
    g = _gen(0)
    mix = torch.randn(4, 4, generator=g)
    y = (torch.randn(n, 4, generator=g) @ mix) * torch.tensor([0.01, 1.0, 30.0, 1000.0]) + 5.0
    if binary:
        b = (torch.rand(n, 2, generator=g) < 0.4).float()
        b[0], b[1] = 1.0, 0.0  # no constant column
        y = torch.cat([y[:, :2], b[:, :1], y[:, 2:], b[:, 1:]], dim=1)  # binary in the middle and at the end
    return y


def _model(y: torch.Tensor, mode: str, standardize: bool = True, missing: str = "reject", by_z: bool = False) -> vae.VAE:
    spec = vae.describe_table(y, likelihood="auto", standardize=standardize, missing=missing)
    torch.manual_seed(3)
    model = vae.VAE(spec, vae.ModelConfig(latent_dim=2, hidden_dims=(8,), decoder_variance=mode, noise_rank=2,
                                          noise_by_z=by_z))
    with torch.no_grad():  # a noise far from its start: correlated, uneven
        if by_z:  # scales from 0.1 to 10 that vary with z
            model.decoder.noise_gate.fill_(1.0)
            model.decoder.net[-1].weight.mul_(3.0)
        noise = model.decoder.noise
        assert noise is not None
        noise.raw_diag.copy_(torch.randn(noise.raw_diag.shape, generator=_gen(1)))
        if mode == "full":
            noise.lower.copy_(0.7 * torch.randn(noise.lower.shape, generator=_gen(2)))
        else:
            noise.factor.copy_(torch.randn(noise.factor.shape, generator=_gen(2)))
    return model


def _expected(model: vae.VAE, y: torch.Tensor, out) -> torch.Tensor:
    """log p(y|z) per (sample, row) in original units from torch's distributions."""
    gauss = model.gaussian
    s, loc = model.scale.double()[gauss], model.loc.double()[gauss]
    tril = out.scale_tril.double()
    scale = s if out.log_scale is None else s * out.log_scale.double().exp()  # (G,) or (..., G)
    cov = scale[..., :, None] * (tril @ tril.T) * scale[..., None, :]
    mean = loc + s * out.loc.double()[..., gauss]
    total = MultivariateNormal(mean, cov).log_prob(y.double()[:, gauss])
    if bool((~gauss).any()):
        total = total + Bernoulli(logits=out.loc.double()[..., ~gauss]).log_prob(y.double()[:, ~gauss]).sum(-1)
    return total


@pytest.mark.parametrize("mode", ["full", "lowrank"])
@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("by_z", [False, True])
def test_cells_add_up_to_the_multivariate_normal_in_original_units(mode, binary, standardize, by_z):
    y = _table(binary=binary)
    model = _model(y, mode, standardize, by_z=by_z)
    x, mask = model.standardize(y)
    out = model.decode(torch.randn(3, y.shape[0], 2, generator=_gen(4)))
    assert out.scale_tril is not None and out.scale_tril.shape == (4, 4)
    if by_z:
        assert out.log_scale is not None and out.log_scale.shape == (3, y.shape[0], 4)
        assert float(out.log_scale.detach().abs().max()) > 1.0
    got = model.log_px_z(x, out, mask)
    assert got.shape == (3, y.shape[0], y.shape[1])
    torch.testing.assert_close(got.double().sum(-1), _expected(model, y, out), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("mode", ["full", "lowrank"])
@pytest.mark.parametrize("by_z", [False, True])
def test_masked_cells_are_the_marginal_of_the_observed_cells(mode, by_z):
    y = _table(binary=True)
    holes = torch.rand(y.shape, generator=_gen(5)) < 0.3
    holes[:, 0] = False  # every row keeps a cell
    y_nan = torch.where(holes, torch.nan, y)
    model = _model(y, mode, missing="mask", by_z=by_z)
    x, mask = model.standardize(y_nan)
    assert mask is not None
    out = model.decode(torch.randn(y.shape[0], 2, generator=_gen(6)))
    got = model.log_px_z(x, out, mask)
    assert torch.all(got[holes] == 0)
    gauss = model.gaussian
    s, loc = model.scale.double(), model.loc.double()
    tril = out.scale_tril.double()
    for row in range(y.shape[0]):
        sd = s[gauss] if out.log_scale is None else s[gauss] * out.log_scale[row].double().exp()
        cov = sd[:, None] * (tril @ tril.T) * sd[None, :]
        seen = ~holes[row]
        g = seen[gauss]  # observed Gaussian cells of this row
        mean = (loc + s * out.loc.double()[row])[gauss][g]
        expected = MultivariateNormal(mean, cov[g][:, g]).log_prob(y.double()[row, gauss][g])
        b = seen & ~gauss
        expected = expected + Bernoulli(logits=out.loc.double()[row, b]).log_prob(y.double()[row, b]).sum()
        torch.testing.assert_close(got[row].double().sum(), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("mode", ["full", "lowrank"])
def test_samples_have_the_noise_covariance(mode):
    y = _table()
    spec = vae.describe_table(y)
    torch.manual_seed(0)
    model = vae.VAE(spec, vae.ModelConfig(latent_dim=2, hidden_dims=(), decoder_variance=mode, noise_rank=2))
    _model_noise = _model(y, mode).decoder.noise
    model.decoder.noise.load_state_dict(_model_noise.state_dict())
    marginal = affine_vae_marginal(model)
    draws = vae.sample(model, 200_000, generator=_gen(0)).double()
    torch.testing.assert_close(draws.mean(0), marginal.mean, rtol=0, atol=0.02 * float(marginal.cov.diagonal().sqrt().max()))
    corr = torch.corrcoef(draws.T)
    sd = marginal.cov.diagonal().sqrt()
    torch.testing.assert_close(corr, marginal.cov / (sd[:, None] * sd[None, :]), rtol=0, atol=0.01)


@pytest.mark.parametrize("mode", ["full", "lowrank"])
def test_draws_at_one_z_have_the_scaled_noise_covariance(mode):
    """model.noise_by_z: y | z ~ N(mean(z), D(z) Sigma D(z)), in original units."""
    y = _table()
    model = _model(y, mode, by_z=True)
    with torch.no_grad():
        out = model.decode(torch.randn(1, 2, generator=_gen(7)).expand(100_000, 2))
        draws = model.sample_from(out, _gen(8)).double()
    s = model.scale.double() * out.log_scale[0].double().exp()
    tril = out.scale_tril.double()
    cov = s[:, None] * (tril @ tril.T) * s[None, :]
    sd = cov.diagonal().sqrt()
    torch.testing.assert_close(draws.std(0), sd, rtol=0.02, atol=0)
    torch.testing.assert_close(torch.corrcoef(draws.T), cov / (sd[:, None] * sd[None, :]), rtol=0, atol=0.02)


@pytest.mark.parametrize("mode", ["full", "lowrank"])
@pytest.mark.parametrize("standardize", [True, False])
def test_scales_by_z_keep_every_conditional_std_above_min_sigma(mode, standardize):
    """A head that asks for D(z) -> 0 meets the same floor as the shared noise: each conditional std
    of D Sigma D, D_jj L_jj, stays at least model.min_sigma (table units), so a row on its mean
    gets a finite, bounded density; a closed head is left at D = I exactly."""
    y = _table()
    model = _model(y, mode, standardize=standardize, by_z=True)
    with torch.no_grad():
        model.decoder.net[-1].bias[model.decoder.n_out:].fill_(-50.0)
        out = model.decode(torch.randn(16, 2, generator=_gen(9)))
        floor = torch.log(model.decoder.min_sigma * model.decoder.noise_scale)  # likelihood units
        cond = out.log_scale + out.scale_tril.diagonal().log()  # log D_jj L_jj
        assert bool((cond >= floor - 1e-5).all())
        assert bool((out.log_scale < 0).any())  # the head still scales down, to the floor
        x = out.loc  # rows on their means: residual 0
        cells = model.log_px_z(x, out, None)
        bound = -0.5 * math.log(2 * math.pi) - floor - model.scale.log()  # -log(min std), table units
        assert bool(torch.isfinite(cells).all()) and bool((cells <= bound + 1e-4).all())
        model.decoder.noise_gate.zero_()
        assert bool((model.decode(torch.randn(4, 2)).log_scale == 0).all())
