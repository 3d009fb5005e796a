"""The CUDA path: sync-free steps, CUDA-graph replay, precision, pinned transfers (skipped without CUDA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import vae
from tests.vae.helpers import curved_rows, inject_nan
from vae.train import TrainState, _Trainer

pytestmark = pytest.mark.gpu


def _rows(n: int = 2000, d: int = 16, seed: int = 0) -> torch.Tensor:
    return curved_rows(n, d, k=3, seed=seed)


def _model(y: torch.Tensor, **config) -> vae.VAE:
    return vae.VAE(vae.describe_table(y), vae.ModelConfig(**{"latent_dim": 3, "hidden_dims": (32, 32), **config}), seed=0)


def _cfg(**kwargs) -> vae.TrainConfig:
    base = {"epochs": 5, "batch_size": 128, "lr": 1e-3, "val_fraction": 0.2, "device": "cuda", "refit": False,
            "precision": "fp32"}
    return vae.TrainConfig(**{**base, **kwargs})


def _without_seconds(history) -> list[dict]:
    return [{k: v for k, v in dataclasses.asdict(h).items() if k != "seconds"} for h in history]


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


@pytest.mark.parametrize("variance", ["full", "lowrank", "per_feature"])
def test_graph_replay_trains_like_eager_steps(variance):
    y = _rows()
    eager, graph = _model(y, decoder_variance=variance), _model(y, decoder_variance=variance)
    he = vae.fit(eager, y, _cfg()).history
    hg = vae.fit(graph, y, _cfg(cuda_graph=True)).history
    for a, b in zip(he, hg, strict=True):
        assert b.train_elbo == pytest.approx(a.train_elbo, abs=1e-3)
        assert b.val_elbo == pytest.approx(a.val_elbo, abs=1e-3)
    for (k, v), w in zip(eager.state_dict().items(), graph.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("graph", [False, True])
def test_cuda_runs_repeat_and_resume_within_tolerance(tmp_path, graph):
    """Same seed, same device: the same numbers up to the nondeterminism of CUDA reductions."""
    y, cfg = _rows(), _cfg(cuda_graph=graph, precision="bf16")
    whole = _model(y)
    full = vae.fit(whole, y, cfg).history

    def save(state: TrainState) -> None:
        if state.epoch == 2:
            vae.save_checkpoint(tmp_path, state)

    vae.fit(_model(y), y, dataclasses.replace(cfg, epochs=2), on_checkpoint=save)
    resumed = _model(y)
    rest = vae.fit(resumed, y, cfg, resume=vae.load_checkpoint(tmp_path)).history
    for a, b in zip(full, rest, strict=True):
        assert b.val_elbo == pytest.approx(a.val_elbo, abs=1e-2)


def test_non_finite_epoch_rolls_back_on_cuda(monkeypatch):
    y = _rows()
    model = _model(y, decoder_variance="lowrank", noise_rank=2)
    inject_nan(monkeypatch, model, lambda call: call == 15)  # step 2 of epoch 2 (13 steps an epoch)
    result = vae.fit(model, y, _cfg(epochs=3, lr_backoff=0.5))
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
    # the CUDA generator draws other eps than the CPU one: compare host and device inputs on CUDA
    from_host = vae.score_rows(model, y, 20, seed=0, batch_rows=700, common_eps=True)
    from_device = vae.score_rows(model, y.cuda(), 20, seed=0, batch_rows=700, common_eps=True)
    assert from_host.log_likelihood.device.type == "cpu" and from_host.log_likelihood.shape == (5000,)
    torch.testing.assert_close(from_host.log_likelihood, from_device.log_likelihood)
