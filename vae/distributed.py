"""Data-parallel training over torch.distributed, one process per rank (torchrun).

What DistributedDataParallel does, for a model whose loss is not its forward (loss_terms calls
encode and decode): every rank starts from rank 0's weights, trains on its shard of the rows with
batch_size / world_size rows a step, and averages the gradients with one all-reduce per step before
clipping, so every rank takes the same Adam step and the weights stay identical. Validation runs on
the same held-out rows on every rank (the split's seed is shared), and rank 0's early-stopping
decision is broadcast. Outside torchrun (or with one process) every function here is a no-op.
Backends: gloo on CPU, nccl on CUDA (one GPU per rank: cuda:LOCAL_RANK).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from vae.config import DeviceName, TrainConfig

_RANK_SEED_STRIDE = 1_000_003  # rank r's noise stream: seed + r * stride (+ step on resume)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> Ranks:
    """The ranks torchrun announced in the environment (one process without it)."""
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def init(device: DeviceName) -> Ranks:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a no-op for one process."""
    ranks = launched()
    if ranks.world_size > 1 and not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(ranks.local_rank)  # resolve_device("cuda") then means this rank's GPU
        dist.init_process_group("nccl" if cuda else "gloo")
    return current()


def current() -> Ranks:
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), launched().local_rank)


def barrier() -> None:
    if current().world_size > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(y: torch.Tensor) -> torch.Tensor:
    """This rank's rows: every world_size-th row from its rank on (all rows for one process).

    Every shard gets the same number of rows (the last N mod world_size rows are left out, as
    DistributedSampler(drop_last=True) does), so every rank takes the same number of steps.
    """
    r = current()
    if r.world_size == 1:
        return y
    return y[r.rank : (y.shape[0] // r.world_size) * r.world_size : r.world_size]


def per_rank(cfg: TrainConfig) -> TrainConfig:
    """batch_size / world_size rows a step on each rank: the same global batch as one process."""
    world = current().world_size
    return cfg if world == 1 else replace(cfg, batch_size=max(1, math.ceil(cfg.batch_size / world)))


def attach(trainer: Any, seed: int, step: int) -> None:
    """Start every rank from rank 0's weights and average gradients (and the loss) before clipping.

    trainer is vae.train's _Trainer: its model, gen and runner (a vae.step.StepRunner) are used.
    """
    r = current()
    if r.world_size == 1:
        return
    for tensor in trainer.model.state_dict().values():
        dist.broadcast(tensor, 0)
    if not r.is_main:  # its own noise and permutations; rank 0 keeps the checkpointed stream
        trainer.gen.manual_seed(seed + r.rank * _RANK_SEED_STRIDE + step)
    trainer.runner.reduce_with(_average_gradients)


def _average_gradients(grad: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """One all-reduce of the flat gradient (FlatAdam's, every parameter's) and the loss, averaged in
    place; a non-finite value on any rank reaches all. Returns the averaged loss."""
    flat = torch.cat([grad, loss.detach().reshape(1).to(grad.dtype)])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    grad.copy_(flat[:-1])
    return flat[-1]


def collective_device() -> torch.device:
    """Where the process group's collectives take tensors: this rank's GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average(means: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row means of each rank's shard -> the means over all rows (on means' device)."""
    if current().world_size == 1:
        return means
    both = torch.cat([means * rows, torch.tensor([float(rows)], dtype=means.dtype, device=means.device)])
    both = both.to(collective_device())
    dist.all_reduce(both)  # nccl takes no CPU tensor: the epoch's means travel to the GPU and back
    return (both[:-1] / both[-1]).to(means.device)


def agree(flag: bool) -> bool:
    """Rank 0's decision on every rank (early stopping)."""
    if current().world_size == 1:
        return flag
    t = torch.tensor([int(flag)]).to(collective_device())
    dist.broadcast(t, 0)
    return bool(t.item())
