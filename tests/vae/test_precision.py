"""train.precision, the bf16-vs-fp32 probe, the large-batch lr rule and the device-side pieces of
the training step, on the CPU (bf16 autocast runs there too)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import vae
from tests.vae.helpers import curved_rows as _rows
from tests.vae.helpers import inject_nan
from vae.noise import nan_if_failed
from vae.precision import autocast, resolve_precision
from vae.probe import precision_gap


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _model(y: torch.Tensor, **config) -> vae.VAE:
    return vae.VAE(vae.describe_table(y), vae.ModelConfig(**{"latent_dim": 2, "hidden_dims": (16,), **config}), seed=0)


def _cfg(**kwargs) -> vae.TrainConfig:
    base = {"epochs": 4, "batch_size": 64, "lr": 3e-3, "val_fraction": 0.2, "device": "cpu", "refit": False}
    return vae.TrainConfig(**{**base, **kwargs})


def test_precision_option_is_checked_and_resolved():
    assert vae.TrainConfig().precision == "auto"
    with pytest.raises(vae.ConfigError, match=r"train\.precision is 'fp16'; choose one of auto, fp32, bf16"):
        vae.TrainConfig(precision="fp16")  # type: ignore[arg-type]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [resolve_precision(p, cpu) for p in ("auto", "fp32", "bf16")] == ["fp32", "fp32", "bf16"]
    assert [resolve_precision(p, cuda) for p in ("auto", "fp32", "bf16")] == ["bf16", "fp32", "bf16"]


@pytest.mark.parametrize("variance", ["full", "lowrank", "per_feature"])
def test_under_bf16_the_networks_run_in_bf16_and_the_loss_terms_in_fp32(variance):
    y = _rows()
    model = _model(y, decoder_variance=variance)
    vae.init_linear_gaussian(model, y)
    x, mask = model.standardize(y[:64])
    seen: list[torch.dtype] = []
    model.decoder.net.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    eps = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    with autocast(torch.device("cpu"), "bf16"):
        t = vae.loss_terms(model, x, mask, 1, None, eps=eps)
    assert seen == [torch.bfloat16]
    assert t.recon.dtype == t.kl.dtype == torch.float32
    if model.decoder.noise is not None:
        with autocast(torch.device("cpu"), "bf16"):
            assert model.decoder.noise.cholesky().dtype == torch.float32
    exact = vae.loss_terms(model, x, mask, 1, None, eps=eps)
    assert not torch.equal(t.recon, exact.recon)  # bf16 did change something
    torch.testing.assert_close(t.elbo, exact.elbo, rtol=0.05, atol=0.5)


def test_probe_reports_the_bf16_minus_fp32_elbo_on_the_same_eps():
    y = _rows()
    model = _model(y)
    vae.init_linear_gaussian(model, y)
    gap = precision_gap(model, y[:128], seed=3)
    assert gap.rows == 128 and model.training  # the probe leaves the mode as it found it
    eps = torch.randn((1, 128, 2), generator=torch.Generator().manual_seed(3))[0]
    exact = vae.loss_terms(model.eval(), *model.standardize(y[:128]), 1, None, eps=eps).elbo
    assert gap.elbo_fp32 == pytest.approx(float(exact.detach().double().mean()), abs=1e-9)
    assert 0 < gap.mean_abs_diff <= gap.max_abs_diff < 1.0  # bf16 differs, by a fraction of a nat here
    assert gap.diff == pytest.approx(gap.elbo_bf16 - gap.elbo_fp32)
    assert precision_gap(model, y[:128], seed=3) == gap  # same seed, same figures
    several = precision_gap(model, y[:128], n_samples=4)
    assert several.rows == 128 and abs(several.diff) < 1.0


def test_bf16_training_on_cpu_runs_reproducibly_and_stays_near_fp32():
    y = _rows()
    runs = [vae.fit(_model(y), y, _cfg(precision=p)).history for p in ("bf16", "bf16", "fp32")]
    bf16, again, fp32 = ([dataclasses.replace(h, seconds=0.0) for h in run] for run in runs)
    assert bf16 == again
    assert bf16 != fp32
    assert bf16[-1].val_elbo == pytest.approx(fp32[-1].val_elbo, abs=0.5)


@pytest.mark.parametrize(("rule", "factor"), [("none", 1.0), ("sqrt", 2.0), ("linear", 4.0)])
def test_large_batch_lr_rule(rule, factor):
    cfg = _cfg(batch_size=256, lr_base_batch=64, lr_scaling=rule, epochs=1, val_fraction=0.0)
    assert cfg.effective_lr == pytest.approx(3e-3 * factor)
    y = _rows()
    result = vae.fit(_model(y), y, cfg)
    assert result.history[0].lr == pytest.approx(3e-3 * factor)
    with pytest.raises(vae.ConfigError, match=r"train\.lr_scaling"):
        _cfg(lr_scaling="cubic")  # type: ignore[arg-type]


@pytest.mark.parametrize("setting", [True, "auto"])
def test_cuda_graph_switch_is_ignored_on_cpu(setting):
    y = _rows()
    a, b = _model(y), _model(y)
    ha = vae.fit(a, y, _cfg(cuda_graph=setting)).history
    hb = vae.fit(b, y, _cfg(cuda_graph=False)).history
    assert [h.val_elbo for h in ha] == [h.val_elbo for h in hb]
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_failed_cholesky_turns_into_nan_not_an_error():
    good = torch.tensor([[4.0, 1.0], [1.0, 2.0]])
    tril = nan_if_failed(*torch.linalg.cholesky_ex(good))
    torch.testing.assert_close(tril, torch.linalg.cholesky(good))
    bad = torch.stack([good, torch.tensor([[1.0, 2.0], [2.0, 1.0]])])  # the second is indefinite
    tril = nan_if_failed(*torch.linalg.cholesky_ex(bad))
    assert torch.isfinite(tril[0]).all() and torch.isnan(tril[1]).all()


def test_non_finite_step_in_a_lowrank_model_rolls_back(monkeypatch):
    """NaN weights reach the noise's Cholesky factor later in the epoch: a rollback, no exception."""
    y = _rows()
    model = _model(y, decoder_variance="lowrank", noise_rank=2)
    inject_nan(monkeypatch, model, lambda call: call == 6)  # step 2 of epoch 2 (4 steps an epoch)
    result = vae.fit(model, y, _cfg(epochs=3, lr_backoff=0.5))
    assert [h.lr for h in result.history] == [3e-3, 1.5e-3, 1.5e-3]
    assert all(torch.isfinite(p).all() for p in model.parameters())
