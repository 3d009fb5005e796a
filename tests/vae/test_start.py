"""The closed-form linear-Gaussian start, the full-Gaussian case and missing cells, in closed form."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.distributions import MultivariateNormal

import vae
from tests.vae.closed_form import affine_vae_marginal, ppca_heldout_loglik


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated(n: int, d: int = 6, seed: int = 0) -> torch.Tensor:
    """Rows of a full-rank Gaussian that no low-rank model fits, columns in units 0.01 to 100."""
    g = _gen(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    scales = torch.logspace(-2, 2, d, dtype=torch.float64)
    mean = torch.randn(d, generator=g, dtype=torch.float64) * scales
    return ((torch.randn(n, d, generator=g, dtype=torch.float64) @ mix) * scales + mean).float()


def _full_gaussian_loglik(train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per-row held-out log N(y; mean, cov) of the maximum-likelihood fit (1/N) of train."""
    t = train.double()
    return MultivariateNormal(t.mean(0), torch.cov(t.T, correction=0)).log_prob(test.double())


def _model(y: torch.Tensor, mode: str, hidden: tuple[int, ...] = (), k: int = 2, **spec) -> vae.VAE:
    torch.manual_seed(0)
    # noise shared over z: the family whose affine case is the closed-form fit
    cfg = vae.ModelConfig(latent_dim=k, hidden_dims=hidden, decoder_variance=mode, noise_rank=2, noise_by_z=False)
    return vae.VAE(vae.describe_table(y, **spec), cfg)


def _config(**kw) -> vae.TrainConfig:
    base = {"epochs": 300, "lr": 3e-3, "batch_size": 256, "val_fraction": 0.0, "device": "cpu", "num_threads": 1,
            "refit": True, "refit_start": "init", "lr_decays": 0, "lr_warmup_steps": 0,
            "early_stopping_patience": 40}  # the start and the refit, not the schedule
    return vae.TrainConfig(**{**base, **kw})


def test_full_noise_affine_vae_reaches_the_full_gaussian_mle_from_a_random_start():
    y = _correlated(6000)
    train, test = y[:4000], y[4000:]
    model = _model(train, "full")
    vae.fit(model, train, _config(init="random", epochs=150, lr=1e-2, batch_size=512))
    closed = float(_full_gaussian_loglik(train, test).mean())
    exact = float(affine_vae_marginal(model).log_prob(test).mean())
    assert exact == pytest.approx(closed, abs=0.05), (exact, closed)
    # pPCA of the same latent size is far below: the correlations live in the noise
    assert closed - ppca_heldout_loglik(train, test, 2, standardize=True) > 1.0
    got = vae.evaluate(model, test, iw_samples=1000, seed=0).log_likelihood
    assert got == pytest.approx(closed, abs=0.05), (got, closed)


@pytest.mark.parametrize("hidden", [(), (16,)])
def test_the_start_of_full_noise_is_the_full_gaussian_with_an_exact_posterior(hidden):
    y = _correlated(800, seed=1)
    model = _model(y, "full", hidden)
    vae.init_linear_gaussian(model, y)
    closed = _full_gaussian_loglik(y, y)
    rows = vae.score_rows(model, y, iw_samples=200, seed=0)
    # q is the exact posterior: every importance weight equals p(y), so even K = 1 is exact
    torch.testing.assert_close(rows.log_likelihood, closed, rtol=0, atol=2e-3)
    assert float(rows.stderr.max()) < 1e-3
    assert float(rows.elbo.mean()) == pytest.approx(float(closed.mean()), abs=0.01)  # KL(q || p(z|y)) = 0


@pytest.mark.parametrize("standardize", [True, False])
def test_the_start_of_shared_noise_is_the_ppca_mle(standardize):
    y = _correlated(800, seed=2)
    model = _model(y, "shared", (16,), standardize=standardize)
    vae.init_linear_gaussian(model, y)
    # standardized: one variance on the standardized scale; raw: one variance in the table's units
    closed = ppca_heldout_loglik(y, y, 2, standardize=standardize)
    assert vae.evaluate(model, y, iw_samples=1, seed=0).log_likelihood == pytest.approx(closed, abs=2e-3)
    assert vae.evaluate(model, y, iw_samples=200, seed=0).elbo == pytest.approx(closed, abs=0.01)


@pytest.mark.parametrize("mode", ["lowrank", "per_feature", "heteroscedastic", "fixed"])
def test_every_start_has_an_exact_posterior(mode):
    y = _correlated(400, seed=3)
    model = _model(y, mode, (16,))
    vae.init_linear_gaussian(model, y)
    rows = vae.score_rows(model, y, iw_samples=200, seed=0)
    assert float(rows.stderr.max()) < 1e-3  # equal importance weights
    assert float(rows.elbo.mean()) == pytest.approx(float(rows.log_likelihood.mean()), abs=0.01)


def test_training_never_ends_below_its_start_on_validation():
    # few rows, a wide network and a large step: training alone would overfit and end lower
    y = _correlated(300, d=8, seed=4)
    train, val = y[:200], y[200:]
    start = float(_full_gaussian_loglik(train, val).mean())
    ends = {}
    for init in ("linear_gaussian", "random"):
        model = _model(train, "full", (64, 64))
        vae.fit(model, train, _config(init=init, epochs=40, lr=1e-2, batch_size=32, early_stopping_patience=100,
                                      refit=False), y_val=val)  # the selection itself
        ends[init] = vae.evaluate(model, val, iw_samples=200, seed=0).log_likelihood
    assert ends["linear_gaussian"] >= start - 0.05, (ends, start)
    assert ends["random"] < start - 0.1, ends  # the settings do hurt a model that starts elsewhere


@pytest.mark.parametrize("start", ["init", "selected"])
@pytest.mark.parametrize("validation", ["fraction", "table", "refit_extra"])
def test_refit_trains_on_all_rows_for_the_chosen_epochs(validation, start):
    """Where no epoch beat the start, the refit's result is the start of all rows, from either refit_start."""
    y = _correlated(300, d=8, seed=4)
    cfg = _config(epochs=6, lr=5e-2, batch_size=32, val_fraction=0.3, early_stopping_patience=100, refit_start=start)
    model = _model(y, "full", (64, 64))
    if validation == "fraction":
        result = vae.fit(model, y, cfg)
    elif validation == "table":  # a validation table of its own: the refit uses its rows too
        result = vae.fit(model, y[:210], cfg, y_val=y[210:])
    else:  # rows only the refit sees: the selection started from (and chose on) the other 270 alone
        result = vae.fit(model, y[:270], cfg, y_refit_extra=y[270:])
        fit_rows = y[:270][vae.train._split(270, cfg)[0]]
        selected = vae.score_rows(vae.train.selection_model(model, result), y, iw_samples=1, seed=0).log_likelihood
        torch.testing.assert_close(selected, _full_gaussian_loglik(fit_rows, y), rtol=0, atol=0.05)
    assert result.best_epoch == 0  # a large step: no epoch beat the start on validation
    assert [h.phase for h in result.history] == ["select"] * 6
    # the result is then the start fitted on all rows: the full Gaussian of all 300 rows
    rows = vae.score_rows(model, y, iw_samples=1, seed=0).log_likelihood
    closed = _full_gaussian_loglik(y, y)
    torch.testing.assert_close(rows, closed, rtol=0, atol=0.05)  # float32 on 8 columns
    assert float(rows.mean()) == pytest.approx(float(closed.mean()), abs=2e-3)
    # (with a chosen epoch count the refit runs that many: test_train's resume test)


def test_rows_for_the_refit_only_are_refused_where_no_refit_runs():
    y = _correlated(200, d=4, seed=1)
    for cfg in (_config(epochs=1, refit=False, val_fraction=0.2), _config(epochs=1, val_fraction=0.0),
                _config(epochs=1, val_fraction=0.2, init="random")):
        with pytest.raises(vae.ConfigError, match="y_refit_extra"):
            vae.fit(_model(y, "full"), y[:150], cfg, y_refit_extra=y[150:])
    vae.fit(_model(y, "full"), y[:150], _config(epochs=1, val_fraction=0.2), y_refit_extra=y[150:])  # a refit runs


def _with_holes(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    holes = torch.rand(y.shape, generator=_gen(seed)) < fraction
    holes[:, 0] &= holes[:, 1:].sum(1) < y.shape[1] - 1  # every row keeps a cell
    return torch.where(holes, torch.nan, y), holes


def test_masked_ppca_iwae_is_the_gaussian_marginal_of_the_observed_cells():
    g = _gen(5)
    w = torch.randn(6, 2, generator=g)
    y = torch.randn(3000, 2, generator=g) @ w.T + 0.3 * torch.randn(3000, 6, generator=g) + 1.0
    y_nan, holes = _with_holes(y, 0.25, 6)
    train, test, test_holes = y_nan[:2000], y_nan[2000:], holes[2000:]
    model = _model(train, "shared", missing="mask")
    vae.fit(model, train, _config(epochs=40))
    marginal = affine_vae_marginal(model)
    exact = torch.stack([
        MultivariateNormal(marginal.mean[~h], marginal.cov[~h][:, ~h]).log_prob(row[~h].double())
        for row, h in zip(test, test_holes, strict=True)
    ])
    # IWAE is a lower bound in expectation whose gap shrinks with K; its standard error does not
    # bound that gap. On complete rows q is close to exact; on rows with holes it is not, and the
    # gap closes slowly (measured: 0.07 nats/row at K = 100, 0.02 at 5000). A density that got the
    # observed block wrong (a missing cell counted, a constant lost) is off by 0.5 nats/row or more.
    rows = vae.score_rows(model, test, iw_samples=5000, seed=1)
    ev = vae.summarize(rows, 5000)
    few = vae.score_rows(model, test, iw_samples=100, seed=1)
    gap, gap_few = rows.log_likelihood - exact, few.log_likelihood - exact
    complete = ~test_holes.any(1)
    se = float(rows.stderr[complete].pow(2).sum().sqrt()) / int(complete.sum())
    assert abs(float(gap[complete].mean())) < 4 * se + 5e-3, float(gap[complete].mean())
    assert -0.05 < float(gap[~complete].mean()) < 4 * ev.log_likelihood_stderr, float(gap[~complete].mean())
    assert float(gap_few[~complete].mean()) < float(gap[~complete].mean())  # the bound tightens with K
    # nats per row: the columns' figures add up to the reconstruction term; missing cells count 0
    assert sum(ev.per_feature_reconstruction) == pytest.approx(ev.reconstruction, abs=1e-6)
    rows = vae.score_rows(model, test, iw_samples=4, seed=1)
    assert torch.all(rows.recon_cells[test_holes] == 0)


def test_one_sample_has_no_standard_error():
    y = _correlated(200, seed=7)
    model = _model(y, "full")
    ev = vae.evaluate(model, y, iw_samples=1, seed=0)
    assert math.isnan(ev.log_likelihood_stderr)
    assert not math.isnan(vae.evaluate(model, y, iw_samples=2, seed=0).log_likelihood_stderr)


def test_scores_with_common_draws_do_not_depend_on_batching():
    y = _correlated(300, seed=8)
    model = _model(y, "full", (16,))
    vae.fit(model, y, _config(epochs=3, init="random"))
    a = vae.score_rows(model, y, iw_samples=16, seed=3, batch_rows=7, common_eps=True).log_likelihood
    b = vae.score_rows(model, y, iw_samples=16, seed=3, batch_rows=300, common_eps=True).log_likelihood
    c = vae.score_rows(model, y[100:101], iw_samples=16, seed=3, common_eps=True).log_likelihood
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(c, a[100:101], rtol=0, atol=1e-5)


def test_without_a_linear_path_training_starts_from_random_weights(caplog):
    y = _correlated(200, seed=9)
    torch.manual_seed(0)
    model = vae.VAE(vae.describe_table(y), vae.ModelConfig(latent_dim=2, hidden_dims=(8,), linear_path=False))
    with pytest.raises(ValueError, match="linear_path"):
        vae.init_linear_gaussian(model, y)
    result = vae.fit(model, y, _config(epochs=2, val_fraction=0.2))  # the default init: a warning, no crash
    assert "random weights" in caplog.text
    assert [h.phase for h in result.history] == ["select", "select"]  # and no refit


def test_a_refit_that_ends_below_the_selection_keeps_the_selected_weights(monkeypatch, caplog):
    import vae.train as train_module

    y = _correlated(300, seed=10)
    cfg = _config(epochs=5, lr=1e-3, batch_size=32, val_fraction=0.3)
    selected = _model(y, "full", (16,))
    vae.fit(selected, y, replace(cfg, refit=False))
    calls = []
    real_init = train_module.init_linear_gaussian

    def init_then_wreck(model, rows):  # the refit's start (the second call) is made useless
        fit = real_init(model, rows)
        calls.append(rows.shape[0])
        if len(calls) == 2:
            with torch.no_grad():
                model.decoder.noise.raw_diag.fill_(-3.0)  # small noise around means 5 sd off
                model.decoder.linear.bias.add_(5.0)
        return fit

    monkeypatch.setattr(train_module, "init_linear_gaussian", init_then_wreck)
    model = _model(y, "full", (16,))
    result = vae.fit(model, y, cfg)  # 5 epochs of Adam at 1e-3 cannot bring the means back
    assert calls == [210, 300] and result.history[-1].phase == "refit"
    assert "keeping the selected weights" in caplog.text
    for key, value in selected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("start", ["init", "selected"])
def test_the_refit_steps_through_every_row(start):
    """The refit trains on the training, validation and refit-only rows: 300 rows at batch 50 are 6
    steps an epoch, where the selection's 200 are 4 (a refit on the selection's rows alone kept
    every other test of the refit green: the start and the guard see all rows either way)."""
    y = _correlated(300, d=6, seed=4)
    y[:, 0] += 2 * torch.randn(300, generator=_gen(1)) ** 2  # beyond the linear start: epochs improve on it
    cfg = _config(epochs=6, lr=3e-3, batch_size=50, early_stopping_patience=100, refit_start=start, refit_epochs=3)
    result = vae.fit(_model(y, "full", (32,)), y[:200], cfg, y_val=y[200:250], y_refit_extra=y[250:])
    steps = {phase: [h.step for h in result.history if h.phase == phase] for phase in ("select", "refit")}
    assert result.best_epoch >= 1 and steps["refit"], steps  # a refit ran
    assert steps["select"] == [4 * (e + 1) for e in range(6)]
    assert steps["refit"] == [6 * (e + 1) for e in range(result.best_epoch if start == "init" else 3)]
