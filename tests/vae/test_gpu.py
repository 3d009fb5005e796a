"""The CUDA path: the default model end to end, the closed-form start, sync-free steps, CUDA-graph
replay, bf16 resume, precision, pinned transfers (skipped without CUDA)."""

from __future__ import annotations

import math

import pytest
import torch

import vae
from tests.vae.helpers import (
    Interrupt,
    assert_same_weights,
    curved_rows,
    inject_nan,
    without_seconds,
)
from vae.init import linear_gaussian_fit
from vae.train import TrainState, _Trainer

pytestmark = pytest.mark.gpu


def _rows(n: int = 2000, d: int = 16, seed: int = 0) -> torch.Tensor:
    return curved_rows(n, d, k=3, seed=seed)


def _model(y: torch.Tensor, **config) -> vae.VAE:
    spec = vae.describe_table(y, missing="mask" if bool(torch.isnan(y).any()) else "reject")
    return vae.VAE(spec, vae.ModelConfig(**{"latent_dim": 3, "hidden_dims": (32, 32), **config}), seed=0)


def _cfg(**kwargs) -> vae.TrainConfig:
    base = {"epochs": 5, "batch_size": 128, "lr": 1e-3, "val_fraction": 0.2, "device": "cuda", "refit": False,
            "precision": "fp32", "cuda_graph": False, "checkpoint_every_s": 0}
    return vae.TrainConfig(**{**base, **kwargs})


def inject_nan_cells(y: torch.Tensor, fraction: float = 0.05) -> torch.Tensor:
    """y with about `fraction` of its cells missing (NaN), never a whole row."""
    holes = torch.rand(y.shape, generator=torch.Generator().manual_seed(1)) < fraction
    holes[:, 0] = False
    return torch.where(holes, torch.nan, y)


@pytest.mark.parametrize("variance", ["full", "lowrank", "per_feature", "heteroscedastic", "shared", "fixed"])
def test_closed_form_start_on_cuda_is_the_cpu_one(variance):
    """The start is computed on the CPU in float64 and moved: a model on CUDA gets the CPU's numbers
    (a binary column too: its Bernoulli start is set beside the Gaussian ones)."""
    y = torch.cat([_rows(500, 6), (_rows(500, 1, seed=1) > 0).float()], dim=1)
    cpu, gpu = _model(y, decoder_variance=variance), _model(y, decoder_variance=variance).cuda()
    vae.init_linear_gaussian(cpu, y)
    vae.init_linear_gaussian(gpu, y.cuda())
    for (k, v), w in zip(cpu.state_dict().items(), gpu.state_dict().values(), strict=True):
        assert w.device.type == "cuda", k
        torch.testing.assert_close(w.cpu(), v, rtol=1e-6, atol=1e-6, msg=k)
    assert linear_gaussian_fit(gpu, y.cuda()) is not None


def test_the_default_model_trains_evaluates_embeds_and_samples_on_cuda():
    """params.yaml's model and train sections as they are (vae.ModelConfig() and vae.TrainConfig():
    closed-form start, bf16, CUDA graphs by auto, refit) on CUDA, then every reader of the model."""
    y = _rows(3000, 16)
    train, test = y[:2500], y[2500:]
    spec = vae.describe_table(train)
    model = vae.VAE(spec, vae.ModelConfig(), seed=0)
    cfg = vae.TrainConfig(epochs=6, device="cuda")
    assert (cfg.precision, cfg.cuda_graph, cfg.init, cfg.refit) == ("auto", "auto", "linear_gaussian", True)
    result = vae.fit(model, train, cfg)
    assert next(model.parameters()).device.type == "cuda"
    assert [h.phase for h in result.history].count("refit") == result.best_epoch
    assert all(h.val_elbo is not None and math.isfinite(h.val_elbo) for h in result.history)
    ev = vae.evaluate(model, test, iw_samples=50)
    assert ev.n_rows == 500 and math.isfinite(ev.log_likelihood) and ev.elbo <= ev.log_likelihood + 0.5
    baselines = vae.fit_baselines(train, spec, 8)
    assert baselines is not None
    full_gauss = float(baselines.log_prob(test.cuda())["full_gauss"].mean())  # rows on CUDA, fit on the CPU
    assert ev.log_likelihood > full_gauss - 1.0  # trained from the full Gaussian: not far below it
    emb = vae.embed(model, test, with_variance=True)
    assert emb.z.shape == (500, 8) and emb.z.device.type == "cpu" and torch.isfinite(emb.z).all()
    scores = vae.score_rows(model, train, 20, seed=0, common_eps=True)
    threshold = vae.anomaly_threshold(scores.log_likelihood, 0.01)
    assert math.isfinite(threshold)
    rows = vae.sample(model, 300, generator=torch.Generator().manual_seed(0))  # a CPU generator, as the pipeline's
    assert rows.shape == (300, 16) and rows.device.type == "cpu" and torch.isfinite(rows).all()
    again = vae.sample(model, 300, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rows, again)
    on_cpu = vae.sample(model.cpu(), 300, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rows, on_cpu, rtol=1e-3, atol=1e-3)  # the same draws whatever the device


@pytest.mark.parametrize("graph", [False, True])
def test_steps_never_synchronize_inside_an_epoch(graph):
    y = _rows()
    model = _model(y).cuda().train()
    trainer = _Trainer(model, _cfg(cuda_graph=graph), torch.device("cuda"), TrainState())
    x, mask = model.standardize(y.cuda())
    eps = torch.randn((x.shape[0], 3), device="cuda")
    trainer.runner.step(x[:128], mask, eps[:128], 1.0)  # a graph is captured on the first step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for a in range(128, x.shape[0], 128):
            trainer.runner.step(x[a : a + 128], mask, eps[a : a + 128], 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(trainer.runner.sums).all()


@pytest.mark.parametrize("variance", ["full", "lowrank", "per_feature", "full+mask"])
def test_graph_replay_trains_like_eager_steps(variance):
    y, masked = _rows(), variance.endswith("+mask")
    if masked:  # missing cells: the mask is a static input of the graph, batched Cholesky factors
        y = inject_nan_cells(y)
    config = {"decoder_variance": variance.removesuffix("+mask")}
    eager, graph = _model(y, **config), _model(y, **config)
    he = vae.fit(eager, y, _cfg()).history
    hg = vae.fit(graph, y, _cfg(cuda_graph="auto")).history  # auto: a graph on CUDA in one process
    for a, b in zip(he, hg, strict=True):
        assert b.train_elbo == pytest.approx(a.train_elbo, abs=1e-3)
        assert b.val_elbo == pytest.approx(a.val_elbo, abs=1e-3)
    for (k, v), w in zip(eager.state_dict().items(), graph.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("graph", [False, True])
def test_cuda_runs_repeat_and_resume_within_tolerance(tmp_path, graph):
    """Same seed, same device: a repeated run within the nondeterminism of CUDA reductions; a resumed
    one is the run itself (measured bit for bit on an H200: every kernel here is deterministic).

    The run is interrupted, not replaced by a shorter one: train.epochs is part of the run (the
    noise head opens after epochs // 2), so a 2-epoch run is not the first 2 epochs of a 5-epoch one.
    """
    y, cfg = _rows(), _cfg(cuda_graph=graph, precision="bf16")
    whole = _model(y)
    full = vae.fit(whole, y, cfg).history
    again = vae.fit(_model(y), y, cfg).history

    def save_then_die(state: TrainState) -> None:
        vae.save_checkpoint(tmp_path, state)
        if state.epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        vae.fit(_model(y), y, cfg, on_checkpoint=save_then_die)
    resumed = _model(y)
    rest = vae.fit(resumed, y, cfg, resume=vae.load_checkpoint(tmp_path)).history
    assert without_seconds(rest) == without_seconds(full)
    assert_same_weights(whole.state_dict(), resumed.state_dict())
    for a, c in zip(full, again, strict=True):
        assert c.val_elbo == pytest.approx(a.val_elbo, abs=1e-2)


def test_resume_with_the_other_graph_setting_keeps_its_own_adam(tmp_path):
    """A checkpoint written by eager steps resumes with graph replay, and vice versa."""
    y = _rows()
    for first, then in ((False, True), (True, False)):
        def save_then_die(state: TrainState) -> None:
            vae.save_checkpoint(tmp_path, state)
            if state.epoch == 2:
                raise Interrupt

        with pytest.raises(Interrupt):
            vae.fit(_model(y), y, _cfg(cuda_graph=first), on_checkpoint=save_then_die)
        rest = vae.fit(_model(y), y, _cfg(cuda_graph=then), resume=vae.load_checkpoint(tmp_path)).history
        assert len(rest) == 5 and all(h.val_elbo is not None and math.isfinite(h.val_elbo) for h in rest)


def test_non_finite_epoch_rolls_back_on_cuda(monkeypatch):
    y = _rows()
    model = _model(y, decoder_variance="lowrank", noise_rank=2)
    inject_nan(monkeypatch, model, lambda call: call == 15)  # step 2 of epoch 2 (13 steps an epoch)
    # eager steps: a graph would replay the decoder without calling the patched Python forward
    result = vae.fit(model, y, _cfg(epochs=3, lr_backoff=0.5, cuda_graph=False))
    assert [h.lr for h in result.history] == [1e-3, 5e-4, 5e-4]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_probe_and_training_on_cuda():
    y = _rows()
    model = _model(y)
    result = vae.fit(model, y, _cfg(precision="bf16"))
    assert all(h.val_elbo is not None and h.val_elbo == h.val_elbo for h in result.history)
    gap = vae.precision_gap(model, y[:1024])
    assert gap.rows == 1024 and abs(gap.diff) < 1.0


def test_embed_and_scores_on_cuda_match_the_cpu():
    y = _rows(5000)
    model = _model(y)
    vae.init_linear_gaussian(model, y)
    cpu_z = vae.embed(model, y, batch_rows=1000, with_variance=True)
    model.cuda()
    for rows in (y, y.cuda()):  # from the host: pinned, overlapped copies; from the device: slices
        z = vae.embed(model, rows, batch_rows=1000, with_variance=True)
        assert z.z.device.type == "cpu" and z.logvar is not None and cpu_z.logvar is not None
        torch.testing.assert_close(z.z, cpu_z.z, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(z.logvar, cpu_z.logvar, rtol=1e-4, atol=1e-4)
    # common eps come from a CPU stream of the seed: host and device inputs, and the CPU, agree
    from_host = vae.score_rows(model, y, 20, seed=0, batch_rows=700, common_eps=True)
    from_device = vae.score_rows(model, y.cuda(), 20, seed=0, batch_rows=700, common_eps=True)
    assert from_host.log_likelihood.device.type == "cpu" and from_host.log_likelihood.shape == (5000,)
    torch.testing.assert_close(from_host.log_likelihood, from_device.log_likelihood)
    on_cpu = vae.score_rows(model.cpu(), y, 20, seed=0, batch_rows=700, common_eps=True)
    torch.testing.assert_close(from_host.log_likelihood, on_cpu.log_likelihood, rtol=1e-4, atol=1e-3)
