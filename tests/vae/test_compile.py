"""train.compile: full-size CPU steps through torch.compile's code, which must be the eager step's
math (to float rounding), resume bit for bit, compile once a run, and fall back to eager steps
when the compiler cannot run."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import vae
from tests.vae.helpers import Interrupt, assert_same_weights, curved_rows, without_seconds
from vae.step import COMPILE_AUTO_BATCHES, resolve_compile

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device name: no GPU is touched


def _model(y: torch.Tensor) -> vae.VAE:
    """The default model's kinds (full noise scaled by z, linear path), small networks."""
    return vae.VAE(vae.describe_table(y), vae.ModelConfig(latent_dim=2, hidden_dims=(16, 16)), seed=0)


def _cfg(**kwargs) -> vae.TrainConfig:
    # 240 training rows at batch 64: three full batches and a short one (which runs eagerly) an
    # epoch; the KL weight changes every step of the warm-up (a tensor input: no recompilation)
    base = {"epochs": 4, "batch_size": 64, "val_fraction": 0.2, "kl_warmup_steps": 6, "refit": False,
            "device": "cpu", "checkpoint_every_s": 0, "compile": True}
    return vae.TrainConfig(**{**base, **kwargs})


def test_compile_defaults_to_auto_and_reads_true_false_from_params():
    assert vae.TrainConfig().compile == "auto"
    for value in ("auto", True, False):
        assert vae.config_from_dict(vae.TrainConfig, "train", {"compile": value}).compile == value
    for bad in (1, "on", None):
        with pytest.raises(vae.ConfigError, match=r"train\.compile .*choose one of auto, true, false"):
            vae.config_from_dict(vae.TrainConfig, "train", {"compile": bad})


@pytest.mark.parametrize(("setting", "device", "rows", "compiled"), [
    ("auto", CPU, COMPILE_AUTO_BATCHES * 128, True), ("auto", CPU, COMPILE_AUTO_BATCHES * 128 - 1, False),
    (True, CPU, 100, True), (False, CPU, 10**6, False), ("auto", CUDA, 10**6, False), (False, CUDA, 10**6, False),
])
def test_compile_resolves_on_the_cpu_on_stages_of_many_batches(setting, device, rows, compiled):
    assert resolve_compile(setting, device, rows, 128) is compiled


def test_forcing_compilation_on_cuda_says_steps_run_eagerly(caplog):
    with caplog.at_level(logging.WARNING, logger="vae.step"):
        assert resolve_compile(True, CUDA, 10**6, 128) is False
    assert len(caplog.records) == 1 and "eagerly" in caplog.records[0].getMessage()


def test_a_compiled_run_takes_the_eager_runs_steps_and_compiles_once(caplog):
    y = curved_rows(300, 5)
    eager_model, compiled_model = _model(y), _model(y)
    with caplog.at_level(logging.INFO, logger="vae.step"):
        eager = vae.fit(eager_model, y, _cfg(compile=False))
        assert not [r for r in caplog.records if r.name == "vae.step"]
        counters.clear()
        compiled = vae.fit(compiled_model, y, _cfg())
    said = [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records if r.name == "vae.step"]
    assert said == [("INFO", "train.compile")]  # once, and no fallback to eager steps
    # forward and backward compiled once for the run: the KL warm-up's changing weight, the lr
    # ramp, the averaged weights' swaps and the noise gate are tensors written in place
    assert counters["stats"]["unique_graphs"] == 1
    assert [h.step for h in compiled.history] == [h.step for h in eager.history]
    for a, b in zip(eager.history, compiled.history, strict=True):
        assert b.train_elbo == pytest.approx(a.train_elbo, rel=1e-4)
        assert b.val_elbo == pytest.approx(a.val_elbo, rel=1e-4)
    for key, value in eager_model.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[key], value, rtol=1e-3, atol=1e-4, msg=key)


def test_a_resumed_compiled_run_continues_bit_for_bit(tmp_path):
    y = curved_rows(300, 5)
    whole = _model(y)
    full = vae.fit(whole, y, _cfg())

    def save_then_die(state: vae.TrainState) -> None:
        vae.save_checkpoint(tmp_path, state)
        if state.epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        vae.fit(_model(y), y, _cfg(), on_checkpoint=save_then_die)
    resumed = _model(y)
    rest = vae.fit(resumed, y, _cfg(), resume=vae.load_checkpoint(tmp_path))
    assert without_seconds(rest.history) == without_seconds(full.history)
    assert_same_weights(whole.state_dict(), resumed.state_dict())


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_without_a_working_compiler_training_goes_on_eagerly(monkeypatch, caplog):
    """No C++ compiler (a name that is no program), no cached code to fall back on: the first
    compiled step fails inside inductor, the run says so once and takes the eager run's steps."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-c++-compiler",))
    monkeypatch.setattr(inductor_config, "force_disable_caches", True)
    torch._dynamo.reset()  # the earlier tests' compiled code must not serve this run
    y = curved_rows(300, 5)
    eager = vae.fit(_model(y), y, _cfg(compile=False))
    with caplog.at_level(logging.WARNING, logger="vae.step"):
        fallen = vae.fit(_model(y), y, _cfg())
    torch._dynamo.reset()
    warnings = [r.getMessage() for r in caplog.records if r.name == "vae.step" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "training goes on eagerly" in warnings[0]
    assert without_seconds(fallen.history) == without_seconds(eager.history)
