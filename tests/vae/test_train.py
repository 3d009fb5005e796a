"""Training: bit-exact resume, early stopping, determinism, warm-up and NaN rollback."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch

import vae
from tests.vae.helpers import Interrupt, assert_same_weights, inject_nan, without_seconds
from tests.vae.helpers import curved_rows as _rows
from vae.adam import FlatAdam


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _model(y: torch.Tensor, init_seed: int = 0, **config) -> vae.VAE:
    torch.manual_seed(init_seed)
    return vae.VAE(vae.describe_table(y), vae.ModelConfig(**{"latent_dim": 2, "hidden_dims": (16,), **config}))


def _cfg(**kwargs) -> vae.TrainConfig:
    base = {"epochs": 6, "batch_size": 64, "lr": 3e-3, "mc_samples": 2, "kl_warmup_steps": 5,
            "val_fraction": 0.2, "early_stopping_patience": 100, "device": "cpu", "refit": False,
            "refit_start": "init", "refit_epochs": 4,  # the refit's tests say which they test
            "ema_steps": 0,  # the kept candidate is the last step's weights, unless a test says otherwise
            "checkpoint_every_s": 0}  # resume tests stop at a given epoch's checkpoint
    return vae.TrainConfig(**{**base, **kwargs})


@pytest.mark.parametrize(("phase", "start", "ema"), [("select", "init", 0), ("refit", "init", 0),
                                                    ("refit", "selected", 0), ("refit", "init", 3)])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, phase, start, ema):
    y, cfg = _rows(), _cfg(refit=True, refit_start=start, ema_steps=ema)
    whole = _model(y)
    full = vae.fit(whole, y, cfg)
    refit_epochs = full.best_epoch if start == "init" else cfg.refit_epochs
    assert [h.phase for h in full.history] == ["select"] * cfg.epochs + ["refit"] * refit_epochs
    assert full.best_epoch >= 3

    def save_then_die(state: vae.TrainState) -> None:
        vae.save_checkpoint(tmp_path, state)
        if state.epoch == 3 and state.phase == phase:
            raise Interrupt

    with pytest.raises(Interrupt):
        vae.fit(_model(y), y, cfg, on_checkpoint=save_then_die)
    state = vae.load_checkpoint(tmp_path)
    done = 3 if phase == "select" else cfg.epochs + 3
    assert state.epoch == 3 and len(state.history) == done
    resumed = _model(y, init_seed=123)  # other initial weights: everything must come from the state
    rest = vae.fit(resumed, y, cfg, resume=state)
    assert_same_weights(whole.state_dict(), resumed.state_dict())
    assert without_seconds(full.history) == without_seconds(rest.history)
    assert (rest.best_epoch, rest.stopped_early) == (full.best_epoch, full.stopped_early)
    assert vae.evaluate(whole, y, iw_samples=10) == vae.evaluate(resumed, y, iw_samples=10)


def test_the_running_average_of_the_weights_is_what_is_validated_and_kept():
    """train.ema_steps: each epoch validates the averaged weights and keeps them when they are the best;
    without validation rows the last epoch's average is the result. The live weights train on. The
    validation figures are those of train.val_iw_samples draws a row (5 here): the ELBO's terms and,
    above them, the importance-weighted log-likelihood early stopping compares."""
    from vae.train import _validated

    y = _rows()
    for val_fraction in (0.2, 0.0):
        cfg = _cfg(epochs=5, kl_warmup_steps=0, val_fraction=val_fraction, ema_steps=4, val_iw_samples=5)
        model, averages = _model(y), {}

        def keep_average(state: vae.TrainState, into: dict = averages) -> None:
            into[state.epoch] = state.optimizer["ema"].clone()

        result = vae.fit(model, y, cfg, on_checkpoint=keep_average)
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        kept = torch.cat([model.state_dict()[n].reshape(-1) for n in trained])
        live = torch.cat([result.state.model[n].reshape(-1) for n in trained])
        assert not torch.equal(averages[cfg.epochs], live)
        if val_fraction == 0:  # the result is the last epoch's average
            assert torch.equal(kept, averages[cfg.epochs])
            continue
        assert result.best_epoch >= 1
        assert torch.equal(kept, averages[result.best_epoch])  # the best epoch's average, not its live weights
        val = model.standardize(vae.train.held_out_rows(y, cfg))
        scored = _validated(model.eval(), val[0], val[1], 5, cfg.seed + 1)
        best = result.history[result.best_epoch - 1]  # what was validated
        assert float(scored.terms.elbo) == pytest.approx(best.val_elbo, rel=1e-6)
        assert scored.log_likelihood == pytest.approx(best.val_log_likelihood, rel=1e-6)
        assert best.val_log_likelihood > best.val_elbo + 1e-5  # five draws: IWAE_5 above their mean log weight
        assert result.state.best_val == best.val_log_likelihood  # the figure the epoch was kept by


def test_patience_on_the_live_weights_stops_where_training_without_an_average_stops():
    """The average never feeds back into the steps, so with train.patience_on live the selection runs
    the same epochs and lr falls as without one, bit for bit on the live weights; only the kept
    candidate differs. patience_on average counts on the averaged weights' ELBO instead."""
    y, model = _overfit_setup()
    base = _cfg(epochs=400, lr=1e-2, batch_size=16, mc_samples=1, kl_warmup_steps=0, val_fraction=0.5,
                early_stopping_patience=5, init="random", lr_decays=1)
    plain = vae.fit(copy.deepcopy(model), y, base)
    live = vae.fit(copy.deepcopy(model), y, dataclasses.replace(base, ema_steps=8, patience_on="live"))
    average = vae.fit(copy.deepcopy(model), y, dataclasses.replace(base, ema_steps=8, patience_on="average"))
    assert plain.stopped_early and live.stopped_early and average.stopped_early
    assert len(live.history) == len(plain.history) and live.state.decay_epochs == plain.state.decay_epochs
    assert [h.train_elbo for h in live.history] == [h.train_elbo for h in plain.history]
    assert_same_weights(live.state.model, plain.state.model)
    assert [h.val_elbo for h in live.history] != [h.val_elbo for h in plain.history]  # the averages'
    assert len(average.history) != len(plain.history)  # its own plateaus


@pytest.mark.parametrize("every_s", [0.0, 3600.0])
def test_checkpoints_come_after_the_first_epoch_then_by_elapsed_time(every_s):
    y, saved = _rows(), []
    cfg = _cfg(refit=True, checkpoint_every_s=every_s)
    result = vae.fit(_model(y), y, cfg, on_checkpoint=lambda s: saved.append((s.phase, s.epoch)))
    refit = [("refit", e) for e in range(1, result.best_epoch + 1)]
    if every_s == 0:  # one every epoch, and the refit's fresh start
        assert saved == [("select", e) for e in range(1, cfg.epochs + 1)] + [("refit", 0)] + refit
    else:  # the first epoch, the refit's start (the selection's end), the run's end: never an hour's work lost
        assert saved == [("select", 1), ("refit", 0), refit[-1]]
        saved.clear()
        vae.fit(_model(y), y, dataclasses.replace(cfg, refit=False), on_checkpoint=lambda s: saved.append((s.phase, s.epoch)))
        assert saved == [("select", 1), ("select", cfg.epochs)]


def test_an_epoch_whose_training_elbo_collapsed_is_never_kept(monkeypatch):
    """The last epoch scores best on validation, but its training ELBO is reported collapsed (as
    a blow-up inside the epoch would leave it): the best candidate before it (the start or an epoch) is kept."""
    from vae.train import _Trainer

    y, cfg = _rows(), _cfg(epochs=4, kl_warmup_steps=0)
    honest = vae.fit(_model(y), y, cfg)
    vals = [h.val_log_likelihood for h in honest.history]
    assert honest.best_epoch == 4 and vals[3] == max(vals), vals  # without a collapse the last one wins
    run_epoch = _Trainer.run_epoch

    def collapse_last(self, x, mask):
        out = run_epoch(self, x, mask)
        if out is not None and self.state.epoch == cfg.epochs - 1:
            return torch.tensor([-1e5, 0.0]), out[1]  # (recon, kl) means of the epoch
        return out

    monkeypatch.setattr(_Trainer, "run_epoch", collapse_last)
    guarded = vae.fit(_model(y), y, cfg)
    assert [h.val_log_likelihood for h in guarded.history] == vals  # the same weights all along ...
    assert guarded.best_epoch in (0, 1 + vals.index(max(vals[:3])))  # ... but the collapsed epoch is not the result
    assert guarded.state.best_val < vals[3]
    assert guarded.state.start_train_elbo > guarded.history[0].train_elbo - 5  # the start's ELBO on its rows
    # with the average kept and patience on the live weights, the collapsed epoch counts as no improvement
    # there too: patience stands where it stands without the average (the schedule stays the same)
    averaged = vae.fit(_model(y), y, dataclasses.replace(cfg, ema_steps=4, patience_on="live"))
    assert averaged.state.bad_epochs == guarded.state.bad_epochs >= 1
    assert averaged.state.best_epoch != cfg.epochs


def test_same_seed_same_numbers_and_the_seed_matters():
    y = _rows()
    a, b, c = _model(y), _model(y), _model(y)
    ha = vae.fit(a, y, _cfg(epochs=3)).history
    hb = vae.fit(b, y, _cfg(epochs=3)).history
    rc = vae.fit(c, y, _cfg(epochs=3, seed=1))
    assert_same_weights(a.state_dict(), b.state_dict())
    assert without_seconds(ha) == without_seconds(hb)
    assert vae.evaluate(a, y, iw_samples=20, seed=3) == vae.evaluate(b, y, iw_samples=20, seed=3)
    assert without_seconds(ha) != without_seconds(rc.history)
    assert not torch.equal(rc.state.model["decoder.net.0.weight"], a.state_dict()["decoder.net.0.weight"])


def test_training_improves_the_elbo_and_follows_the_warmup_ramp():
    y = _rows()
    cfg = _cfg(epochs=8, kl_warmup_steps=12, beta=2.0, val_iw_samples=2)  # two draws, as mc_samples
    hist = vae.fit(_model(y), y, cfg).history
    assert [h.epoch for h in hist] == list(range(1, 9))
    assert [h.step for h in hist] == [4 * e for e in range(1, 9)]  # 240 training rows, batches of 64
    for h in hist:  # the beta of each epoch's last step
        assert h.beta == pytest.approx(vae.kl_weight(h.step - 1, 2.0, 12))
    assert hist[-1].beta == 2.0 and hist[0].beta < 1.0
    assert hist[-1].val_log_likelihood > hist[0].val_log_likelihood
    assert all(h.train_elbo == pytest.approx(h.train_recon - h.train_kl) for h in hist)


def _overfit_setup() -> tuple[torch.Tensor, vae.VAE]:
    """80 rows of pure noise and a wide MLP: validation ELBO peaks within a few epochs. One stage
    (model.noise_by_z's two are tested in test_noise_by_z.py)."""
    y = torch.randn(80, 10, generator=torch.Generator().manual_seed(0))
    return y, _model(y, latent_dim=4, hidden_dims=(128, 128), noise_by_z=False)


def test_early_stopping_restores_the_best_weights():
    y, model = _overfit_setup()
    cfg = _cfg(epochs=400, lr=1e-2, batch_size=16, mc_samples=1, kl_warmup_steps=0,
               val_fraction=0.5, early_stopping_patience=5, init="random", lr_decays=0)
    result = vae.fit(model, y, cfg)
    assert result.stopped_early
    assert result.best_epoch < len(result.history) < cfg.epochs
    assert len(result.history) == result.best_epoch + cfg.early_stopping_patience
    vals = [h.val_log_likelihood for h in result.history]
    assert max(vals) == vals[result.best_epoch - 1]
    assert_same_weights(model.state_dict(), result.state.best_model)


def test_early_stopping_waits_for_the_end_of_warmup():
    y, model = _overfit_setup()
    warmup = 300  # 100 epochs of 3 steps: the validation ELBO falls while beta ramps up
    cfg = _cfg(epochs=400, lr=1e-2, batch_size=16, mc_samples=1, kl_warmup_steps=warmup,
               val_fraction=0.5, early_stopping_patience=5, init="random")
    result = vae.fit(model, y, cfg)
    hist = result.history
    assert result.stopped_early
    warm_epoch = next(h.epoch for h in hist if h.step >= warmup)
    # patience counts only once beta is full: stopping comes at least patience - 1 epochs later
    assert len(hist) >= warm_epoch + cfg.early_stopping_patience - 1
    # the best is the best validation figure of all (the start included), warm-up or not
    vals = [h.val_log_likelihood for h in hist]
    assert result.state.best_val >= max(vals)
    # the test has teeth: during warm-up the validation figure did fall for `patience` epochs
    vals = vals[:warm_epoch]
    assert any(max(vals[: i + 1]) > max(vals[i + 1 : i + 6]) for i in range(warm_epoch - 6))


def test_one_non_finite_step_rolls_back_and_lowers_lr(monkeypatch, caplog):
    y = _rows()
    cfg = _cfg(epochs=6, val_fraction=0.0, lr_backoff=0.5)
    model = _model(y)
    inject_nan(monkeypatch, model, lambda call: call == 14)  # 5 steps per epoch: step 4 of epoch 3
    with caplog.at_level(logging.WARNING, logger="vae.train"):
        result = vae.fit(model, y, cfg)
    assert [h.epoch for h in result.history] == list(range(1, 7))
    assert [h.lr for h in result.history] == [3e-3, 3e-3] + [1.5e-3] * 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(h.train_elbo)) for h in result.history)
    text = caplog.text
    assert "non-finite" in text and "rolled back to the end of epoch 2" in text
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_persistent_non_finite_raises_and_leaves_the_last_good_weights(monkeypatch):
    y = _rows()
    cfg = _cfg(epochs=6, val_fraction=0.0, max_rollbacks=2)
    good = _model(y, noise_by_z=False)  # one stage: a 2-epoch run opens no head after epoch 1
    vae.fit(good, y, dataclasses.replace(cfg, epochs=2))
    model = _model(y, noise_by_z=False)
    # from epoch 3 on (5 steps per epoch) every attempt fails at its 3rd step, after 2 good ones
    inject_nan(monkeypatch, model, lambda call: call > 10 and (call - 11) % 3 == 2)
    with pytest.raises(vae.TrainingDivergedError, match=r"non-finite.*epoch 3.*2 rollbacks.*train\.lr"):
        vae.fit(model, y, cfg)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_same_weights(model.state_dict(), good.state_dict())


def test_persistent_non_finite_with_validation_rows_ends_the_stage_with_its_best_weights(monkeypatch, caplog):
    """With a validated candidate to keep, an epoch that stays non-finite ends the stage as early
    stopping would: the best weights on validation, finite, and a warning instead of an error."""
    y = _rows()
    cfg = _cfg(epochs=6, max_rollbacks=2)  # 240 training rows: 4 steps an epoch
    good = _model(y, noise_by_z=False)
    first = vae.fit(good, y, dataclasses.replace(cfg, epochs=2))
    model = _model(y, noise_by_z=False)
    inject_nan(monkeypatch, model, lambda call: call > 8 and (call - 9) % 3 == 2)  # from epoch 3 on
    with caplog.at_level(logging.WARNING, logger="vae.train"):
        result = vae.fit(model, y, cfg)
    assert "stayed non-finite in epoch 3 after 2 rollbacks" in caplog.text
    assert len(result.history) == 2 and result.state.finished
    assert result.best_epoch == first.best_epoch and result.state.best_val == first.state.best_val
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_same_weights(model.state_dict(), good.state_dict())  # fit() leaves a model at its best weights


def test_validation_table_of_the_wrong_width_is_refused():
    y = _rows()
    with pytest.raises(vae.DataError, match="6 columns|expects 6"):
        vae.fit(_model(y), y, _cfg(epochs=1), y_val=torch.randn(10, 5))


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_gradient_clipping_matches_clip_grad_norm(scale):
    y = _rows()
    model, reference = _model(y), _model(y)
    opt = FlatAdam(list(model.parameters()), 1e-3)  # the gradients are views of opt.grad
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        p.grad.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * scale)
        q.grad = p.grad.clone()
    before = [p.grad.clone() for p in model.parameters()]
    norm = opt.clip_grad_norm(1.0)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    assert (float(norm) > 1.0) == (scale > 1)
    for p, q, b in zip(model.parameters(), reference.parameters(), before, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=0)
        if scale < 1:  # below the limit: untouched, bit for bit (the old host-side test skipped the multiply)
            assert torch.equal(p.grad, b)
    next(model.parameters()).grad[0] = float("nan")
    assert not torch.isfinite(opt.clip_grad_norm(1.0))


def test_the_held_out_rows_are_capped_and_auto_refits_below_ten_thousand_rows():
    from vae.train import REFIT_AUTO_ROWS, calibration_count, validation_count, will_refit

    cfg = vae.TrainConfig()  # val_fraction 0.1 (at most 1,000 rows), calibration_fraction 0.2 (at most 2,000)
    assert [validation_count(n, cfg) for n in (300, 10_000, 100_000)] == [30, 1000, 1000]
    assert [calibration_count(n, cfg) for n in (300, 10_000, 100_000)] == [60, 2000, 2000]
    free = vae.TrainConfig(val_max_rows=0, calibration_max_rows=0)
    assert (validation_count(100_000, free), calibration_count(100_000, free)) == (10_000, 20_000)
    y = _rows()
    model = _model(y)
    assert REFIT_AUTO_ROWS == 10_000 and cfg.refit == "auto"
    assert will_refit(model, cfg, True, 9_999) and not will_refit(model, cfg, True, 10_000)
    assert will_refit(model, vae.TrainConfig(refit=True), True, 10**6)
    assert not will_refit(model, vae.TrainConfig(refit=False), True, 10)
    assert not will_refit(model, cfg, False, 10)  # no validation rows: nothing to choose the epochs on
    with pytest.raises(vae.ConfigError, match=r"train\.refit is 'yes'; choose one of auto, true, false"):
        vae.TrainConfig(refit="yes")  # type: ignore[arg-type]
    with pytest.raises(vae.ConfigError, match=r"train\.val_max_rows is -1"):
        vae.TrainConfig(val_max_rows=-1)


def test_an_epoch_reads_the_device_once(monkeypatch):
    """Clipping, the finite check and the epoch's sums stay tensors: one host read per epoch."""
    y = _rows()
    model = _model(y)
    trainer = vae.train._Trainer(model.train(), _cfg(batch_size=16, grad_clip=1e-3), torch.device("cpu"), vae.TrainState())
    x, mask = model.standardize(y)
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    out = trainer.run_epoch(x, mask)
    monkeypatch.undo()
    assert out is not None and trainer.state.step == 19  # 300 rows in batches of 16
    assert reads == ["tolist"]


@pytest.mark.parametrize(("rows", "sizes"), [(100, [100]), (142, [142]), (192, [64, 128]), (300, [128, 172])])
def test_an_epochs_batches_cover_every_row_once_and_a_short_remainder_joins_a_batch(rows, sizes):
    """batch_bounds at batch 128: a remainder under half a batch is no step of its own (142 rows: one
    step, not 128 + 14); one of at least half a batch is (192: 128 + 64). The epoch then steps on
    exactly those batches, whose sizes add up to the rows."""
    assert sorted(b - a for a, b in vae.train.batch_bounds(rows, 128)) == sizes and sum(sizes) == rows
    y = _rows(rows)
    model = _model(y)
    trainer = vae.train._Trainer(model.train(), _cfg(batch_size=128, val_fraction=0.0), torch.device("cpu"),
                                 vae.TrainState())
    seen: list[int] = []
    step = trainer.runner.step
    trainer.runner.step = lambda xb, *a: (seen.append(xb.shape[0]), step(xb, *a))[1]
    x, mask = model.standardize(y)
    out = trainer.run_epoch(x, mask)
    assert out is not None and sorted(seen) == sizes and trainer.state.step == len(sizes)


def test_bf16_resume_of_the_default_model_is_bit_identical(tmp_path):
    """The CPU twin of test_gpu's resume check, with every model default (the noise head opens at
    epochs // 2) and bf16 autocast: a run interrupted after epoch 2 and resumed is the run itself.
    A run of 2 epochs is not its prefix: its head opens after epoch 1, so the resume must continue
    the same run (same train.epochs), as test_gpu's check does."""
    y = _rows(600, 8, k=3)
    cfg = vae.TrainConfig(epochs=5, batch_size=128, lr=1e-3, val_fraction=0.2, device="cpu", refit=False,
                          precision="bf16", checkpoint_every_s=0)

    def default_model() -> vae.VAE:
        return vae.VAE(vae.describe_table(y), vae.ModelConfig(), seed=0)

    whole = default_model()
    full = vae.fit(whole, y, cfg)
    assert full.state.noise_open_epoch == 2

    def save_then_die(state: vae.TrainState) -> None:
        vae.save_checkpoint(tmp_path, state)
        if state.epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        vae.fit(default_model(), y, cfg, on_checkpoint=save_then_die)
    resumed = default_model()
    rest = vae.fit(resumed, y, cfg, resume=vae.load_checkpoint(tmp_path))
    assert without_seconds(full.history) == without_seconds(rest.history)
    assert_same_weights(whole.state_dict(), resumed.state_dict())
    assert vae.fit(default_model(), y, dataclasses.replace(cfg, epochs=2)).state.noise_open_epoch == 1


def test_the_lr_falls_at_each_plateau_then_the_stage_ends():
    """train.lr_decays: where early stopping would end the stage, the lr falls by train.lr_decay and
    patience starts again; after the last fall the next plateau ends the stage."""
    y, model = _overfit_setup()
    cfg = _cfg(epochs=400, lr=1e-2, batch_size=16, mc_samples=1, kl_warmup_steps=0, val_fraction=0.5,
               early_stopping_patience=5, init="random", lr_decays=2, lr_decay=0.3)
    result = vae.fit(model, y, cfg)
    lrs, vals = [h.lr for h in result.history], [h.val_log_likelihood for h in result.history]
    falls = [e for e in range(1, len(lrs)) if lrs[e] != lrs[e - 1]]  # epoch e ran last at the old lr
    assert result.state.decay_epochs == falls and len(falls) == 2
    assert lrs[-1] == pytest.approx(1e-2 * 0.3**2) and lrs[0] == 1e-2
    for end in [*falls, len(vals)]:  # each plateau: `patience` epochs below the best before them
        assert max(vals[end - 5 : end]) <= max(vals[: end - 5])
    assert result.stopped_early and len(vals) < cfg.epochs
    assert max(vals) == vals[result.best_epoch - 1]


def test_the_refit_replays_the_selections_lr_falls(tmp_path):
    y = _rows()
    cfg = _cfg(epochs=60, lr=1e-2, early_stopping_patience=2, kl_warmup_steps=0, refit=True, lr_decays=3)
    result = vae.fit(_model(y), y, cfg)
    select = [h for h in result.history if h.phase == "select"]
    refit = [h for h in result.history if h.phase == "refit"]
    assert any(e < result.best_epoch for e in result.state.decay_epochs), "no fall before the chosen epoch"
    assert len(refit) == result.best_epoch
    assert [h.lr for h in refit] == [h.lr for h in select[: len(refit)]]

    def save_then_die(state: vae.TrainState) -> None:  # a resume after the first fall goes on bit for bit
        vae.save_checkpoint(tmp_path, state)
        if state.phase == "refit" and state.epoch == result.state.decay_epochs[0] + 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        vae.fit(_model(y), y, dataclasses.replace(cfg, checkpoint_every_s=0), on_checkpoint=save_then_die)
    rest = vae.fit(_model(y, init_seed=5), y, cfg, resume=vae.load_checkpoint(tmp_path))
    assert without_seconds(rest.history) == without_seconds(result.history)


def test_the_lr_warms_up_over_the_first_steps_of_each_stage(monkeypatch):
    """train.lr_warmup_steps: the k-th step of a stage (k = 1..W) runs at lr * k / W, written into
    Adam's lr tensor (a CUDA graph reads it: no new capture); the refit starts its own ramp."""
    from vae.step import StepRunner

    seen: list[float] = []
    step = StepRunner.step

    def spy(self, x, mask, eps, beta):
        seen.append(float(self.opt.lr))
        return step(self, x, mask, eps, beta)

    monkeypatch.setattr(StepRunner, "step", spy)
    y, w = _rows(), 6  # 240 training rows, batches of 64: 4 steps an epoch
    result = vae.fit(_model(y), y, _cfg(lr_warmup_steps=w, refit=True, kl_warmup_steps=0))
    select = seen[:24]  # six epochs
    assert select == pytest.approx([3e-3 * k / w for k in range(1, w + 1)] + [3e-3] * (24 - w))
    refit = seen[24:]
    assert result.best_epoch >= 2 and len(refit) == 5 * result.best_epoch  # 300 rows: 5 steps an epoch
    assert refit[:w] == pytest.approx([3e-3 * k / w for k in range(1, w + 1)])
    assert all(h.lr == 3e-3 for h in result.history)  # history records the stage's lr, not the ramp

    # train.lr_warmup_epochs caps the ramp at that many epochs of the stage's own steps
    seen.clear()
    result = vae.fit(_model(y), y, _cfg(lr_warmup_steps=100, lr_warmup_epochs=1, refit=True, kl_warmup_steps=0))
    assert seen[:5] == pytest.approx([3e-3 * k / 4 for k in range(1, 5)] + [3e-3])  # 4 steps an epoch
    assert seen[24:30] == pytest.approx([3e-3 * k / 5 for k in range(1, 6)] + [3e-3])  # the refit's 5


def test_the_refit_from_the_selected_weights_goes_on_at_the_selections_last_lr(monkeypatch):
    """train.refit_start selected: the refit starts from the weights early stopping chose (their
    noise head as it was), on all rows, for train.refit_epochs epochs at the lr the selection ended
    at, without a warm-up; its start is the selected model itself, which it keeps unless an epoch
    beats it on the validation rows."""
    from vae.train import _Trainer

    y = _rows()
    cfg = _cfg(epochs=60, lr=1e-2, early_stopping_patience=2, kl_warmup_steps=0, refit=True, lr_decays=2,
               refit_start="selected", refit_epochs=3, lr_warmup_steps=4)
    starts: list[dict[str, torch.Tensor]] = []
    init = _Trainer.__init__

    def spy(self, model, cfg, device, state, compiled=False):
        init(self, model, cfg, device, state, compiled)
        if state.phase == "refit":
            starts.append({k: v.clone() for k, v in model.state_dict().items()})

    monkeypatch.setattr(_Trainer, "__init__", spy)
    result = vae.fit(_model(y), y, cfg)
    select = [h for h in result.history if h.phase == "select"]
    refit = [h for h in result.history if h.phase == "refit"]
    assert len(result.state.decay_epochs) == 0 and len(refit) == 3 and refit[-1].stage_over
    assert [h.lr for h in refit] == [1e-2 * 0.3**2] * 3 == [select[-1].lr] * 3  # the selection's last lr
    assert_same_weights(starts[0], result.state.selected_model)  # started from the chosen weights
    assert result.state.best_val >= result.state.selected_val  # never ends below them on validation


def test_a_refit_from_the_selected_weights_that_does_not_beat_them_keeps_them(monkeypatch):
    from vae.train import _Trainer

    y = _rows()
    cfg = _cfg(epochs=6, refit=True, refit_start="selected", refit_epochs=2, kl_warmup_steps=0)
    run_epoch = _Trainer.run_epoch

    def wreck_refit(self, x, mask):  # every refit epoch scrambles the decoder: worse on validation
        out = run_epoch(self, x, mask)
        if self.state.phase == "refit":
            with torch.no_grad():
                for p in self.model.decoder.parameters():
                    p.add_(torch.randn_like(p))
        return out

    monkeypatch.setattr(_Trainer, "run_epoch", wreck_refit)
    model = _model(y)
    result = vae.fit(model, y, cfg)
    assert result.state.best_epoch == 0 and result.state.best_val == result.state.selected_val
    assert_same_weights(model.state_dict(), result.state.selected_model)


def test_validation_draws_are_train_val_iw_samples_within_a_budget_of_row_draws():
    """25 draws a row on a small table's validation rows, fewer where the rows are many (a pass
    scores at most VALIDATION_DRAWS row-draws), never none; 1 is the mean log weight of one draw."""
    from vae.train import VALIDATION_DRAWS, validation_draws

    cfg = _cfg(val_iw_samples=25)
    assert [validation_draws(cfg, n) for n in (14, 163, 164, 1000, VALIDATION_DRAWS, 50_000)] == [25, 25, 24, 4, 1, 1]
    assert validation_draws(_cfg(val_iw_samples=1), 14) == 1
    with pytest.raises(vae.ConfigError, match="train.val_iw_samples"):
        _cfg(val_iw_samples=0)
