"""model.noise_by_z: two training stages (the head opens when the first would stop), resumable,
and on heteroscedastic rows a better held-out likelihood than noise shared over z."""

from __future__ import annotations

import pytest
import torch

import vae
from tests.vae.helpers import Interrupt, assert_same_weights


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _hetero_rows(n: int, seed: int) -> torch.Tensor:
    """(t + noise, noise whose std grows as exp(t)): one latent, noise that depends on it."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, 1, generator=g)
    e = torch.randn(n, 2, generator=g)
    return torch.cat([t + 0.05 * e[:, :1], 0.3 * torch.exp(t) * e[:, 1:]], dim=1)


def _model(y: torch.Tensor, by_z: bool = True) -> vae.VAE:
    torch.manual_seed(0)
    return vae.VAE(vae.describe_table(y), vae.ModelConfig(latent_dim=1, hidden_dims=(32,), noise_by_z=by_z))


def _cfg(**train) -> vae.TrainConfig:
    return vae.TrainConfig(**{"epochs": 120, "batch_size": 64, "lr": 3e-3, "val_fraction": 0.2,
                              "early_stopping_patience": 10, "device": "cpu", "checkpoint_every_s": 0,
                              "refit": True, "refit_start": "init", "lr_decays": 0,
                              **train})  # the stages, not the lr schedule


def _fit(y: torch.Tensor, by_z: bool, **train) -> tuple[vae.VAE, vae.FitResult]:
    model = _model(y, by_z)
    return model, vae.fit(model, y, _cfg(**train))


def test_the_head_opens_when_the_first_stage_would_stop_and_the_refit_opens_it_alike():
    y = _hetero_rows(800, 0)
    opened: dict[str, int] = {}
    model, cfg = _model(y), _cfg()

    def gate(stats: vae.EpochStats) -> None:
        if float(model.decoder.noise_gate) == 1.0:
            opened.setdefault(stats.phase, stats.epoch)

    result = vae.fit(model, y, cfg, on_epoch=gate)
    select = [h for h in result.history if h.phase == "select"]
    assert 0 < opened["select"] < len(select) < cfg.epochs  # the second stage stopped early too
    # the stage stopped as early stopping would have: patience epochs after its best
    first_best = max(select[: opened["select"]], key=lambda h: h.val_log_likelihood or float("-inf")).epoch
    assert opened["select"] in (first_best + cfg.early_stopping_patience, cfg.epochs // 2)
    assert result.best_epoch > opened["select"]  # the second stage found better weights
    assert float(model.decoder.noise_gate) == 1.0
    # the refit ran the chosen count and opened the head after the same epoch
    assert len(result.history) - len(select) == result.best_epoch
    assert opened["refit"] == opened["select"]


def test_resume_across_the_opening_is_bit_identical(tmp_path):
    y = _hetero_rows(600, 1)
    _, whole = _fit(y, by_z=True, epochs=40, early_stopping_patience=2, refit=False)
    opened = whole.state.noise_open_epoch
    assert 0 < opened < 35

    def save_then_die(state: vae.TrainState) -> None:
        vae.save_checkpoint(tmp_path, state)
        if state.phase == "select" and state.epoch == opened + 2:
            raise Interrupt

    model, cfg = _model(y), _cfg(epochs=40, early_stopping_patience=2, refit=False)
    with pytest.raises(Interrupt):
        vae.fit(model, y, cfg, on_checkpoint=save_then_die)
    resumed = vae.fit(model, y, cfg, resume=vae.load_checkpoint(tmp_path))
    assert resumed.state.noise_open_epoch == opened
    assert_same_weights(whole.state.best_model, resumed.state.best_model)


def test_scales_by_z_beat_shared_noise_on_heteroscedastic_rows():
    y, test = _hetero_rows(800, 2), _hetero_rows(2000, 3)  # margin measured: 0.85 nats/row
    shared, _ = _fit(y, by_z=False)
    by_z, _ = _fit(y, by_z=True)
    ll_shared = vae.evaluate(shared, test, iw_samples=200).log_likelihood
    ll_by_z = vae.evaluate(by_z, test, iw_samples=200).log_likelihood
    assert ll_by_z > ll_shared + 0.2, (ll_by_z, ll_shared)
