"""One optimizer step with nothing read back to the host: the loop can run ahead of the device.

Gradient clipping and the finite check are device tensors; per-epoch sums of the ELBO terms (SUMMED) and
of (gradient norm + loss), non-finite if any step's was, accumulate in `sums`, read once per epoch. On CUDA with
train.cuda_graph (auto: wherever a graph is correct, see resolve_cuda_graph), full-size steps (forward,
backward, clipping, Adam) replay from one CUDA graph. On the CPU with train.compile (auto: on stages of
many steps, see resolve_compile), full-size steps run the loss and its gradient as torch.compile's code.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from dataclasses import fields

import torch

from vae.adam import FlatAdam
from vae.config import Compile, CudaGraph, TrainConfig
from vae.elbo import LossTerms, loss_terms
from vae.model import VAE
from vae.precision import Resolved, autocast

log = logging.getLogger(__name__)
WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuBLAS handles, lazy state)
SUMMED = tuple(f.name for f in fields(LossTerms))  # the terms `sums` adds up, in its order (the ELBO is their difference)
COMPILE_AUTO_BATCHES = 64  # train.compile auto: stages of at least this many full batches an epoch
COMPILED_SHAPES = 256  # models of distinct shapes (and options) one process compiles steps for


def resolve_cuda_graph(setting: CudaGraph, device: torch.device, world_size: int = 1) -> bool:
    """Whether full-size steps replay from a CUDA graph (train.cuda_graph).

    Never on the CPU; never with several processes (data parallel: the gradients' all-reduce runs
    between backward and Adam, and no graph here holds a collective). Everywhere else on CUDA a
    replayed step is the eager step: an epoch's last batch of another size runs eagerly, a rollback
    captures again, masks and the KL weight are static inputs, the noise gate a buffer read in
    place. So auto is on there; true is the same (with a warning where it cannot be honoured).
    """
    if device.type != "cuda" or setting is False:
        return False
    if world_size > 1:
        if setting is True:
            log.warning("train.cuda_graph true: steps run eagerly with %d processes (a graph holds no all-reduce)",
                        world_size)
        return False
    return True


def resolve_compile(setting: Compile, device: torch.device, rows: int, batch_size: int) -> bool:
    """Whether a stage's full-size steps run torch.compile's code (train.compile): on the CPU only
    (on CUDA a graph replays the step). auto: where an epoch holds COMPILE_AUTO_BATCHES full batches
    of the stage's `rows` (this process's): compiling takes seconds (20-23 the first time on a
    2-vCPU machine, 3 once inductor's cache holds the code) and saves one to two milliseconds a
    step, which a stage of few steps would not earn back."""
    if setting is False:
        return False
    if device.type != "cpu":
        if setting is True:
            log.warning("train.compile true: on %s steps run eagerly (train.cuda_graph replays them)", device.type)
        return False
    return setting is True or rows // batch_size >= COMPILE_AUTO_BATCHES


def loss_and_sums(model: VAE, x: torch.Tensor, mask: torch.Tensor | None, eps: torch.Tensor,
                  beta: float | torch.Tensor, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's loss (the negative beta-ELBO, mean over the rows) and each SUMMED term's sum over
    them (detached): the part of a step torch.compile may run (beta a 0-d tensor there, so that a
    KL warm-up compiles once)."""
    t = loss_terms(model, x, mask, n_samples, None, eps=eps)
    loss = -(t.recon - beta * t.kl).mean()
    return loss, torch.stack([getattr(t, name).detach().sum() for name in SUMMED])


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> FlatAdam:
    """Adam over the model's trainable parameters, rewired as views of one flat buffer (vae.adam):
    one round of kernels a step on the CPU and on CUDA, replayable from a graph as it is; with
    train.ema_steps it keeps the weights' running average too."""
    return FlatAdam([p for p in params if p.requires_grad], cfg.effective_lr, cfg.ema_steps)


class StepRunner:
    """Optimizer steps of one fit() call; `sums` (len(SUMMED) + 1,): each SUMMED term's sum over the
    rows, then the sum of (grad norm + loss), finite unless a step's loss or gradient was not."""

    def __init__(self, model: VAE, opt: FlatAdam, cfg: TrainConfig, device: torch.device, precision: Resolved,
                 graph: bool = False, compiled: bool = False):
        """graph: replay full-size steps from a CUDA graph (resolve_cuda_graph); compiled: run their
        loss and gradient as torch.compile's code (resolve_compile)."""
        self.model, self.opt, self.cfg, self.device, self.precision = model, opt, cfg, device, precision
        self.sums = torch.zeros(len(SUMMED) + 1, dtype=torch.float64, device=device)
        self.use_graph = device.type == "cuda" and graph
        # torch.compile's wrapper; dynamo compiles it at the first full-size step (an epoch's last
        # batch, when not a full one, runs eagerly: one shape, one compilation). Its cache is loss_and_sums's,
        # so a second stage on the same model compiles nothing again.
        self.compiled: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = (
            torch.compile(loss_and_sums, dynamic=False) if compiled else None)
        if self.compiled is not None:
            log.info("train.compile: full-size steps run torch.compile's code (the first step compiles: "
                     "about 3 s, 20 s or more the first time on a machine)")
        self.compiled_ran = False  # a compiled step has run: a later error is the step's, not the compiler's
        self.beta = torch.zeros((), device=device)  # the KL weight of a compiled step, written in place
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, ...] = ()
        # data parallel: averages the flat gradient (opt.grad, in place) and the loss over ranks before clipping
        self.reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def reduce_with(self, reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Average gradients over ranks each step; steps run eagerly (no CUDA graph holds a collective)."""
        self.reduce, self.use_graph = reduce, False
        self.drop_graph()

    def step(self, x: torch.Tensor, mask: torch.Tensor | None, eps: torch.Tensor, beta: float) -> None:
        """x (B, D), mask (B, D) or None, eps (B, K) or (M, B, K) on the device; beta the KL weight.
        The lr is the optimizer's tensor: a change (warm-up, fall) needs no new graph."""
        if not self.use_graph or x.shape[0] != self.cfg.batch_size:  # an epoch's last batch of another size runs eagerly
            self._compute(x, mask, eps, beta, cache=True)
            return
        if self.graph is None:
            self._capture(x, mask, eps, beta)
        self.static[0].copy_(x)
        self.static[1].copy_(eps)
        self.static[2].fill_(beta)  # a kernel argument, no host-device copy
        if mask is not None:
            self.static[3].copy_(mask)
        assert self.graph is not None
        self.graph.replay()

    def drop_graph(self) -> None:
        """Capture again at the next full-size step."""
        self.graph, self.static = None, ()

    def _compute(self, x: torch.Tensor, mask: torch.Tensor | None, eps: torch.Tensor, beta: float | torch.Tensor,
                 cache: bool) -> None:
        if self.compiled is not None and x.shape[0] == self.cfg.batch_size:
            loss, sums = self._compiled_gradient(x, mask, eps, beta)
        else:
            loss, sums = self._gradient(loss_and_sums, x, mask, eps, beta, cache)
        if self.reduce is not None:
            loss = self.reduce(self.opt.grad, loss)
        norm = self.opt.clip_grad_norm(self.cfg.grad_clip)
        self.opt.step()
        # a non-finite loss or gradient norm makes the last sum non-finite: the epoch's finite check
        self.sums += torch.cat([sums, (norm + loss.detach()).reshape(1)])

    def _gradient(self, fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
                  mask: torch.Tensor | None, eps: torch.Tensor, beta: float | torch.Tensor,
                  cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat gradient of the step's loss (zeroed first), the loss and the terms' sums."""
        self.opt.zero_grad()
        with autocast(self.device, self.precision, cache):
            loss, sums = fn(self.model, x, mask, eps, beta, self.cfg.mc_samples)
        loss.backward()
        return loss, sums

    def _compiled_gradient(self, x: torch.Tensor, mask: torch.Tensor | None, eps: torch.Tensor,
                           beta: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """_gradient through torch.compile's code. Its first call compiles (the forward and the
        backward); where that fails (no C++ compiler, an operator inductor cannot lower) the run
        goes on eagerly with a warning: nothing was applied yet, the gradient is computed again."""
        assert self.compiled is not None
        self.beta.fill_(beta)
        if self.compiled_ran:
            return self._gradient(self.compiled, x, mask, eps, self.beta)
        try:
            # a process that trains models of many shapes (a notebook, a long-lived server) compiles
            # once per shape: past dynamo's default of 8 it would fall back to eager steps
            with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=COMPILED_SHAPES):
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")
                out = self._gradient(self.compiled, x, mask, eps, self.beta)
        except Exception as err:  # noqa: BLE001 - any compiler failure; the eager step below re-raises a step's own
            log.warning("train.compile: torch.compile failed (%s: %s); training goes on eagerly",
                        type(err).__name__, str(err).strip().splitlines()[0][:300] if str(err).strip() else "")
            self.compiled = None
            return self._gradient(loss_and_sums, x, mask, eps, beta)
        self.compiled_ran = True
        return out

    def _capture(self, x: torch.Tensor, mask: torch.Tensor | None, eps: torch.Tensor, beta: float) -> None:
        """Warm up on a side stream, put weights, Adam's state and sums back, capture one step."""
        beta_t = torch.full((), beta, device=self.device)
        self.static = (x.clone(), eps.clone(), beta_t, *(() if mask is None else (mask.clone(),)))
        static_mask = self.static[3] if mask is not None else None
        saved = (copy.deepcopy(self.model.state_dict()), self.sums.clone(),
                 {k: v.clone() for k, v in self.opt.state_dict().items()})
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._compute(self.static[0], static_mask, self.static[1], self.static[2], cache=False)
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.no_grad():  # in place: the graph keeps these addresses
            self.model.load_state_dict(saved[0])
            self.sums.copy_(saved[1])
            self.opt.load_state_dict(saved[2])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._compute(self.static[0], static_mask, self.static[1], self.static[2], cache=False)
        self.graph = graph
