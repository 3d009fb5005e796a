"""One optimizer step with nothing read back to the host: the loop can run ahead of the device.

Gradient clipping and the finite check are device tensors; per-epoch sums of the ELBO terms (SUMMED) and
of (gradient norm + loss), non-finite if any step's was, accumulate in `sums`, read once per epoch. On CUDA with
train.cuda_graph (auto: wherever a graph is correct, see resolve_cuda_graph), full-size steps (forward,
backward, clipping, Adam) replay from one CUDA graph.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import fields

import torch

from vae.adam import FlatAdam
from vae.config import CudaGraph, TrainConfig
from vae.elbo import LossTerms, loss_terms
from vae.model import VAE
from vae.precision import Resolved, autocast

log = logging.getLogger(__name__)
WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuBLAS handles, lazy state)
SUMMED = tuple(f.name for f in fields(LossTerms))  # the terms `sums` adds up, in its order (the ELBO is their difference)


def resolve_cuda_graph(setting: CudaGraph, device: torch.device, world_size: int = 1) -> bool:
    """Whether full-size steps replay from a CUDA graph (train.cuda_graph).

    Never on the CPU; never with several processes (data parallel: the gradients' all-reduce runs
    between backward and Adam, and no graph here holds a collective). Everywhere else on CUDA a
    replayed step is the eager step: the shorter last batch of an epoch runs eagerly, a rollback
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


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> FlatAdam:
    """Adam over the model's trainable parameters, rewired as views of one flat buffer (vae.adam):
    one round of kernels a step on the CPU and on CUDA, replayable from a graph as it is; with
    train.ema_steps it keeps the weights' running average too."""
    return FlatAdam([p for p in params if p.requires_grad], cfg.effective_lr, cfg.ema_steps)


class StepRunner:
    """Optimizer steps of one fit() call; `sums` (len(SUMMED) + 1,): each SUMMED term's sum over the
    rows, then the sum of (grad norm + loss), finite unless a step's loss or gradient was not."""

    def __init__(self, model: VAE, opt: FlatAdam, cfg: TrainConfig, device: torch.device, precision: Resolved,
                 graph: bool = False):
        """graph: replay full-size steps from a CUDA graph (resolve_cuda_graph)."""
        self.model, self.opt, self.cfg, self.device, self.precision = model, opt, cfg, device, precision
        self.sums = torch.zeros(len(SUMMED) + 1, dtype=torch.float64, device=device)
        self.use_graph = device.type == "cuda" and graph
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
        if not self.use_graph or x.shape[0] != self.cfg.batch_size:  # the last, shorter batch runs eagerly
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
        self.opt.zero_grad()
        with autocast(self.device, self.precision, cache):
            t = loss_terms(self.model, x, mask, self.cfg.mc_samples, None, eps=eps)
        loss = -(t.recon - beta * t.kl).mean()
        loss.backward()
        if self.reduce is not None:
            loss = self.reduce(self.opt.grad, loss)
        norm = self.opt.clip_grad_norm(self.cfg.grad_clip)
        self.opt.step()
        # a non-finite loss or gradient norm makes the third sum non-finite: the epoch's finite check
        self.sums += torch.stack([*(getattr(t, name).detach().sum() for name in SUMMED), norm + loss.detach()])

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
