"""Device choices checked on the CPU: train.cuda_graph, Adam's variant across a checkpoint, the
noise generator of a resumed run, and draws from a generator on another device than the model."""

from __future__ import annotations

import logging

import pytest
import torch

import vae
from tests.vae.helpers import curved_rows
from vae.draws import standard_normal, uniform
from vae.step import load_optimizer_state, resolve_cuda_graph

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device name: no GPU is touched


def test_cuda_graph_defaults_to_auto_and_reads_true_false_from_params():
    assert vae.TrainConfig().cuda_graph == "auto"
    for value in ("auto", True, False):  # YAML's true / false arrive as bools
        assert vae.config_from_dict(vae.TrainConfig, "train", {"cuda_graph": value}).cuda_graph == value
    for bad in (1, "on", "yes", None):
        with pytest.raises(vae.ConfigError, match=r"train\.cuda_graph .*choose one of auto, true, false"):
            vae.config_from_dict(vae.TrainConfig, "train", {"cuda_graph": bad})
    with pytest.raises(vae.ConfigError, match=r"train\.cuda_graph"):
        vae.TrainConfig(cuda_graph=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(("setting", "device", "world", "graph"), [
    ("auto", CPU, 1, False), (True, CPU, 1, False), (False, CPU, 1, False),
    ("auto", CUDA, 1, True), (True, CUDA, 1, True), (False, CUDA, 1, False),
    ("auto", CUDA, 2, False), (True, CUDA, 2, False), (False, CUDA, 2, False),
])
def test_cuda_graph_resolves_on_cuda_in_one_process_only(setting, device, world, graph):
    assert resolve_cuda_graph(setting, device, world) is graph


def test_forcing_a_graph_under_data_parallel_says_it_runs_eagerly(caplog):
    with caplog.at_level(logging.WARNING, logger="vae.step"):
        assert resolve_cuda_graph(True, CUDA, 4) is False
        assert resolve_cuda_graph("auto", CUDA, 4) is False
    assert len(caplog.records) == 1 and "eagerly with 4 processes" in caplog.records[0].getMessage()


def _adam(params: list[torch.nn.Parameter], **variant) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=1e-2, **variant)


def _two_steps(opt: torch.optim.Adam, p: torch.nn.Parameter, start: int) -> None:
    for i in range(start, start + 2):
        opt.zero_grad()
        (p.pow(2).sum() * (i + 1)).backward()
        opt.step()


def test_a_checkpoint_of_another_adam_variant_keeps_the_runs_own():
    """load_state_dict alone would take fused/capturable from the checkpoint (a run resumed on
    another device or graph setting would switch kernels, or fail to capture its graph)."""
    torch.manual_seed(0)
    p0 = torch.nn.Parameter(torch.randn(5))
    writer = torch.nn.Parameter(p0.detach().clone())
    fused = _adam([writer], fused=True)  # fused keeps its step count as a float32 tensor
    _two_steps(fused, writer, 0)
    reader = torch.nn.Parameter(writer.detach().clone())
    opt = _adam([reader], foreach=True)
    load_optimizer_state(opt, fused.state_dict())
    group = opt.param_groups[0]
    assert (group["foreach"], group["fused"], group["capturable"]) == (True, None, False)
    step = opt.state[reader]["step"]
    assert step.device.type == "cpu" and step.dtype == torch.float32 and float(step) == 2.0
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[reader][key], fused.state[writer][key]), key
    _two_steps(opt, reader, 2)  # the foreach kernels carry on from the fused run's moments
    assert float(opt.state[reader]["step"]) == 4.0 and torch.isfinite(reader).all()


def test_a_checkpoint_from_another_device_kind_is_refused_by_name(tmp_path):
    y = curved_rows()
    cfg = vae.TrainConfig(epochs=2, batch_size=64, val_fraction=0.2, device="cpu", refit=False)
    spec = vae.describe_table(y)
    model = vae.VAE(spec, vae.ModelConfig(latent_dim=2, hidden_dims=(8,)), seed=0)
    state = vae.fit(model, y, cfg).state
    state.finished, state.epoch = False, 1
    state.generator = torch.Generator(device="cpu").get_state()[:16]  # a CUDA generator's state is 16 bytes
    with pytest.raises(vae.ConfigError, match=r"another device; resume it with the train\.device it ran on"):
        vae.fit(vae.VAE(spec, vae.ModelConfig(latent_dim=2, hidden_dims=(8,)), seed=0), y, cfg, resume=state)


def test_draws_come_from_the_generators_device_and_land_on_the_target():
    gen = torch.Generator().manual_seed(3)
    eps = standard_normal((4, 2), gen, CPU, torch.float64)
    assert eps.dtype == torch.float64
    torch.testing.assert_close(eps, torch.randn((4, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    u = uniform((3,), gen, torch.device("meta"))  # drawn on the CPU, then moved
    assert u.device.type == "meta" and u.shape == (3,)
    torch.manual_seed(5)
    a = standard_normal((2,), None, CPU)
    torch.manual_seed(5)
    assert torch.equal(a, torch.randn(2))  # no generator: the target device's global stream


def test_common_eps_scores_come_from_a_cpu_stream_of_the_seed():
    """common_eps draws (K, 1, K_latent) from torch.Generator().manual_seed(seed) on the CPU, then
    moves them: a row's score is the same whatever device scores it (the anomaly threshold)."""
    y = curved_rows(40)
    model = vae.VAE(vae.describe_table(y), vae.ModelConfig(latent_dim=2, hidden_dims=(8,)), seed=0)
    vae.init_linear_gaussian(model, y)
    scores = vae.score_rows(model, y, 7, seed=11, batch_rows=16, common_eps=True)
    eps = torch.randn((7, 1, 2), generator=torch.Generator().manual_seed(11))
    from vae.evaluate import _score_batch

    torch.testing.assert_close(scores.log_likelihood, _score_batch(model, y, eps, 7).log_likelihood)
