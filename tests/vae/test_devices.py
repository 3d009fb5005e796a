"""Device choices checked on the CPU: train.cuda_graph, Adam's state across a checkpoint, the
noise generator of a resumed run, and draws from a generator on another device than the model."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch

import vae
from tests.vae.helpers import curved_rows
from vae.adam import FlatAdam
from vae.draws import standard_normal, uniform
from vae.step import resolve_cuda_graph

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


def _quadratic_steps(step: Callable[[], None], zero: Callable[[], None], params: list[torch.nn.Parameter],
                     start: int, n: int) -> None:
    for i in range(start, start + n):
        zero()
        sum((p.pow(2) * (i + 1) + p.pow(3)).sum() for p in params).backward()
        step()


def _pair(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((4, 3), (3,), (2, 2))]
    return ours, [torch.nn.Parameter(p.detach().clone()) for p in ours]


def test_flat_adam_takes_torch_adams_steps_on_views_of_one_buffer():
    """The same update as torch.optim.Adam (to float32 rounding: its step size is a float32 tensor); the parameters and
    their gradients are views of the optimizer's two flat buffers, which backward fills in place."""
    ours, theirs = _pair()
    opt, ref = FlatAdam(ours, 1e-2), torch.optim.Adam(theirs, lr=1e-2)
    assert all(p.data_ptr() == opt.data[o:].data_ptr() and p.grad.data_ptr() == opt.grad[o:].data_ptr()
               for p, o in zip(ours, (0, 12, 15), strict=True))
    _quadratic_steps(opt.step, opt.zero_grad, ours, 0, 30)
    _quadratic_steps(ref.step, ref.zero_grad, theirs, 0, 30)
    assert float(opt.step_count) == 30.0
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)
        assert p.grad.data_ptr() >= opt.grad.data_ptr()  # still a view: accumulated in place


@pytest.mark.parametrize("window", [1, 4, 50])
def test_flat_adam_keeps_the_running_average_of_its_weights(window):
    """After step n the average moves max(1/W, 1/n) of the way to the weights: the plain mean of the
    iterates while n <= W, an exponential average after (recurrence in float64 beside it); averaged()
    lends it to the parameters and puts the live weights back bit for bit."""
    ours, theirs = _pair(2)
    opt, plain = FlatAdam(ours, 1e-2, average_steps=window), FlatAdam(theirs, 1e-2)
    expected, iterates = opt.data.double().clone(), []
    for n in range(1, 13):
        _quadratic_steps(opt.step, opt.zero_grad, ours, n - 1, 1)
        _quadratic_steps(plain.step, plain.zero_grad, theirs, n - 1, 1)
        iterates.append(opt.data.double().clone())
        expected += max(1 / window, 1 / n) * (iterates[-1] - expected)
        torch.testing.assert_close(opt.ema.double(), expected, rtol=1e-5, atol=1e-6)
        if n <= window:
            torch.testing.assert_close(opt.ema.double(), torch.stack(iterates).mean(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(opt.data, plain.data)  # the average never feeds back into the steps
    live = opt.data.clone()
    with opt.averaged():
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in ours]), opt.ema)
    assert torch.equal(opt.data, live) and torch.equal(ours[0].detach().reshape(-1), live[:12])
    assert torch.equal(opt.state_dict()["ema"], opt.ema)


def test_a_state_without_an_average_starts_it_at_the_weights():
    """A checkpoint written without train.ema_steps (or before it) resumes with the average at the
    current weights; an optimizer without one ignores a saved average."""
    ours, _ = _pair(3)
    plain = FlatAdam(ours, 1e-2)
    _quadratic_steps(plain.step, plain.zero_grad, ours, 0, 3)
    averaging = FlatAdam(ours, 1e-2, average_steps=10)
    averaging.ema.zero_()
    averaging.load_state_dict(plain.state_dict())
    assert torch.equal(averaging.ema, averaging.data) and float(averaging.step_count) == 3.0
    FlatAdam(ours, 1e-2).load_state_dict(averaging.state_dict())
    with pytest.raises(ValueError, match="average_steps must be >= 0"):
        FlatAdam(ours, 1e-2, average_steps=-1)


@pytest.mark.parametrize("variant", [{"foreach": True}, {"fused": True}])
def test_a_checkpoint_of_torch_adam_resumes_in_flat_adam(variant):
    """Checkpoints written before FlatAdam hold torch.optim.Adam's per-parameter state (fused keeps
    its step count as a float32 tensor): resumed, the run goes on as torch's Adam would."""
    ours, theirs = _pair(1)
    ref = torch.optim.Adam(theirs, lr=1e-2, **variant)
    _quadratic_steps(ref.step, ref.zero_grad, theirs, 0, 3)
    with torch.no_grad():
        for p, q in zip(ours, theirs, strict=True):
            p.copy_(q)
    opt = FlatAdam(ours, 1e-2)
    opt.load_state_dict(ref.state_dict())
    assert float(opt.step_count) == 3.0
    assert torch.equal(opt.exp_avg, torch.cat([ref.state[q]["exp_avg"].reshape(-1) for q in theirs]))
    _quadratic_steps(opt.step, opt.zero_grad, ours, 3, 5)
    _quadratic_steps(ref.step, ref.zero_grad, theirs, 3, 5)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)


def test_an_optimizer_state_of_another_model_is_refused():
    opt = FlatAdam(_pair()[0], 1e-2)
    other = FlatAdam([torch.nn.Parameter(torch.zeros(5))], 1e-2)
    with pytest.raises(ValueError, match="another model"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="holds 1 parameters, this model 3"):
        opt.load_state_dict(torch.optim.Adam([torch.nn.Parameter(torch.zeros(5))]).state_dict())


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
