"""Categorical columns: softmax over the training levels, checked against closed forms."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.distributions import MultivariateNormal

import vae
from vae.init import init_linear_gaussian

LEVELS = (("a", "b", "c"), ("x", "y"))


def _mixed(n: int = 600, seed: int = 0) -> torch.Tensor:
    """Two correlated real columns and two categorical columns (codes) whose level depends on them."""
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.tensor([[2.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
    first = torch.bucketize(real[:, 0].contiguous(), torch.tensor([-1.0, 1.0], dtype=torch.float64)).double()  # 3 levels
    second = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(real[:, 1])).double()  # 2 levels
    return torch.stack([real[:, 0] + 10, first, real[:, 1] * 100, second], dim=1).float()


def _spec(y: torch.Tensor, **kw) -> vae.TableSpec:
    return vae.describe_table(y, ["r0", "c0", "r1", "c1"], levels=[(), LEVELS[0], (), LEVELS[1]], **kw)


def _freq_loglik(y: torch.Tensor, cols: list[int]) -> torch.Tensor:
    """Per-row sum over categorical columns of log(empirical level frequency)."""
    out = torch.zeros(y.shape[0], dtype=torch.float64)
    for j in cols:
        codes = y[:, j].long()
        freq = torch.bincount(codes).double() / codes.numel()
        out += freq.log()[codes]
    return out


def test_a_categorical_only_table_with_z_ignored_scores_the_empirical_entropy():
    g = torch.Generator().manual_seed(1)
    y = torch.stack([torch.randint(0, 3, (500,), generator=g), torch.randint(0, 2, (500,), generator=g)], 1).float()
    spec = vae.describe_table(y, ["c0", "c1"], levels=LEVELS)
    assert spec.kinds == ("categorical", "categorical")
    model = vae.VAE(spec, vae.ModelConfig(latent_dim=2, hidden_dims=()), seed=0)
    with torch.no_grad():  # the decoder ignores z: logits log(frequency); q(z|y) is the prior
        for p in (*model.decoder.parameters(), *model.encoder.parameters()):
            p.zero_()
        layer = model.decoder.net[-1]
        for off, col in ((0, 0), (3, 1)):
            freq = torch.bincount(y[:, col].long()).double() / y.shape[0]
            layer.bias[2 + off : 2 + off + freq.numel()] = freq.log().float()
    entropy = 0.0
    for col in (0, 1):
        freq = torch.bincount(y[:, col].long()).double() / y.shape[0]
        entropy -= float((freq * freq.log()).sum())
    ev = vae.evaluate(model, y, iw_samples=50, seed=0)
    assert ev.log_likelihood == pytest.approx(-entropy, abs=1e-5)
    assert ev.elbo == pytest.approx(-entropy, abs=1e-5)
    assert ev.log_likelihood_stderr == pytest.approx(0.0, abs=1e-6)
    # per-feature reconstruction: each column's own -H, adding up
    freq0 = torch.bincount(y[:, 0].long()).double() / y.shape[0]
    assert ev.per_feature_reconstruction[0] == pytest.approx(float((freq0 * freq0.log()).sum()), abs=1e-5)


def test_the_linear_start_is_exactly_the_full_gaussian_times_the_level_frequencies():
    y = _mixed()
    spec = _spec(y)
    assert spec.kinds == ("gaussian", "categorical", "gaussian", "categorical")
    model = vae.VAE(spec, vae.ModelConfig(latent_dim=1, hidden_dims=(), decoder_variance="full", noise_by_z=False), seed=0)
    init_linear_gaussian(model, y)
    real = y[:, [0, 2]].double()
    closed = MultivariateNormal(real.mean(0), torch.cov(real.T, correction=0)).log_prob(real) + _freq_loglik(y, [1, 3])
    ev = vae.evaluate(model, y, iw_samples=20, seed=0)
    assert ev.log_likelihood == pytest.approx(float(closed.mean()), abs=2e-3)
    assert ev.log_likelihood_stderr < 1e-4  # the posterior is exact: every importance weight is p(y)
    base = vae.fit_baselines(y, spec, latent_dim=1)
    assert base is not None
    full = base.log_prob(y)["full_gauss"]
    assert float(full.mean()) == pytest.approx(float(closed.mean()), abs=1e-6)


def test_training_learns_the_dependence_of_the_levels_on_the_real_columns():
    y = _mixed(1500)
    train, test = y[:1200], y[1200:]
    spec = _spec(train)
    model = vae.VAE(spec, vae.ModelConfig(latent_dim=2, hidden_dims=(32,)), seed=0)
    vae.fit(model, train, vae.TrainConfig(epochs=60, lr=3e-3, batch_size=128, val_fraction=0.1, device="cpu", refit=False))
    base = vae.fit_baselines(train, spec, latent_dim=2)
    assert base is not None
    ll = vae.evaluate(model, test, iw_samples=100, seed=0).log_likelihood
    full = float(base.log_prob(test)["full_gauss"].mean())
    # c0 is a function of r0 and c1 depends on r1: far better than independent frequencies
    assert ll > full + 0.3, (ll, full)


def test_samples_draw_the_levels_at_the_decoders_probabilities():
    y = _mixed(2000)
    model = vae.VAE(_spec(y), vae.ModelConfig(latent_dim=1, hidden_dims=(), noise_by_z=False), seed=0)
    init_linear_gaussian(model, y)  # the levels independent of z, at their training frequencies
    draws = vae.sample(model, 20000, generator=torch.Generator().manual_seed(0))
    for j, n in ((1, 3), (3, 2)):
        assert set(draws[:, j].unique().tolist()) <= set(range(n))
        got = torch.bincount(draws[:, j].long(), minlength=n).double() / draws.shape[0]
        want = torch.bincount(y[:, j].long(), minlength=n).double() / y.shape[0]
        assert torch.allclose(got, want, atol=0.015), (got, want)


def test_a_missing_categorical_cell_is_marginalized():
    y = _mixed(400)
    spec = _spec(y, missing="mask")
    model = vae.VAE(spec, vae.ModelConfig(latent_dim=1, hidden_dims=(), noise_by_z=False), seed=0)
    init_linear_gaussian(model, y)
    holed = y.clone()
    holed[:, 1] = float("nan")
    full = vae.score_rows(model, y, iw_samples=10, seed=0).log_likelihood
    part = vae.score_rows(model, holed, iw_samples=10, seed=0).log_likelihood
    freq = torch.bincount(y[:, 1].long()).double() / y.shape[0]
    # the start's p(y) factorizes: leaving c0 out removes exactly its log frequency
    assert torch.allclose(full - part, freq.log()[y[:, 1].long()], atol=1e-3)


def test_levels_round_trip_through_a_model_directory_and_old_specs_still_load(tmp_path):
    y = _mixed(300)
    model = vae.VAE(_spec(y), vae.ModelConfig(latent_dim=2, hidden_dims=(8,)), seed=0)
    vae.save_model(tmp_path, model)
    manifest = json.loads((tmp_path / "model.json").read_text())
    assert manifest["table"]["levels"] == [[], list(LEVELS[0]), [], list(LEVELS[1])]
    loaded = vae.load_model(tmp_path)
    assert loaded.spec.levels == model.spec.levels
    torch.testing.assert_close(vae.score_rows(loaded, y, 5).log_likelihood, vae.score_rows(model, y, 5).log_likelihood)
    numeric = vae.describe_table(y[:, [0, 2]])
    assert "levels" not in numeric.to_dict()  # a numeric table's manifest is as before
    assert vae.TableSpec.from_dict(numeric.to_dict()).levels == ()


def test_codes_outside_the_levels_are_refused_by_column_and_row():
    y = _mixed(50)
    y[7, 1] = 3.0
    with pytest.raises(vae.DataError, match=r"column 'c0' row 7 holds 3.0, not a level code 0..2"):
        _spec(y)
    assert math.isfinite(float(_mixed(50)[0, 0]))


@pytest.mark.parametrize("mode", ["fixed", "shared", "per_feature", "heteroscedastic", "full", "lowrank"])
@pytest.mark.parametrize("hidden", [(), (8,)], ids=["affine", "mlp"])
def test_every_noise_kind_takes_categorical_columns(mode: str, hidden: tuple[int, ...]):
    y = _mixed(300)
    y[::17, 1] = float("nan")
    spec = _spec(y, missing="mask")
    model = vae.VAE(spec, vae.ModelConfig(latent_dim=2, hidden_dims=hidden, decoder_variance=mode, noise_rank=1), seed=0)
    vae.fit(model, y, vae.TrainConfig(epochs=3, batch_size=64, val_fraction=0.2, device="cpu"))
    ev = vae.evaluate(model, y, iw_samples=5, seed=0)
    assert math.isfinite(ev.log_likelihood)
    draws = vae.sample(model, 100, generator=torch.Generator().manual_seed(0))
    assert set(draws[:, 1].tolist()) <= {0.0, 1.0, 2.0} and set(draws[:, 3].tolist()) <= {0.0, 1.0}
    recon = vae.reconstruct(model, y[:20])
    assert set(recon[:, 1].tolist()) <= {0.0, 1.0, 2.0}
