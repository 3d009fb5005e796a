"""Fit a VAE on in-memory tensors: Adam on the negative ELBO, resumable, guarded against NaN."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from vae.config import DeviceName, TrainConfig
from vae.elbo import LossTerms, kl_weight, loss_terms
from vae.errors import ConfigError, DataError, TrainingDivergedError
from vae.model import VAE
from vae.table import check_values

log = logging.getLogger(__name__)


def resolve_device(name: DeviceName) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based count of finished epochs
    step: int
    beta: float
    lr: float
    train_elbo: float
    train_recon: float
    train_kl: float
    val_elbo: float | None
    val_recon: float | None
    val_kl: float | None
    seconds: float


@dataclass
class TrainState:
    """Everything a run needs to continue bit for bit; saved with torch.save(weights_only-safe)."""

    epoch: int = 0
    step: int = 0
    lr: float = 0.0
    best_val: float = float("-inf")
    best_epoch: int = 0
    bad_epochs: int = 0
    finished: bool = False
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    best_model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    generator: torch.Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**d)


@dataclass(frozen=True)
class FitResult:
    history: tuple[EpochStats, ...]
    best_epoch: int
    stopped_early: bool
    state: TrainState


def _split(n: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    n_val = round(n * cfg.val_fraction)
    if cfg.val_fraction > 0 and (n_val < 1 or n - n_val < 1):
        raise DataError(f"train.val_fraction {cfg.val_fraction} of {n} rows leaves an empty split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    return perm[n_val:], perm[:n_val]


def _tensor(t: torch.Tensor | None) -> torch.Tensor:
    assert t is not None, "a snapshot always holds the generator state"
    return t


def _clone(tree: Any) -> Any:
    return copy.deepcopy(tree)


@torch.no_grad()
def _mean_terms(model: VAE, x: torch.Tensor, mask: torch.Tensor | None, cfg: TrainConfig, seed: int) -> LossTerms:
    gen = torch.Generator(device=x.device).manual_seed(seed)
    recon, kl = [], []
    for i in range(0, x.shape[0], 4096):
        m = None if mask is None else mask[i : i + 4096]
        t = loss_terms(model, x[i : i + 4096], m, cfg.mc_samples, gen)
        recon.append(t.recon)
        kl.append(t.kl)
    return LossTerms(torch.cat(recon).mean(), torch.cat(kl).mean())


class _Trainer:
    """Holds the run's mutable pieces; one instance per fit() call."""

    def __init__(self, model: VAE, cfg: TrainConfig, device: torch.device, state: TrainState):
        self.model, self.cfg, self.device, self.state = model, cfg, device, state
        self.params = list(model.parameters())
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.amp = device.type == "cuda"  # bf16 autocast on GPU; loss terms are computed in fp32
        if state.model:
            model.load_state_dict(state.model)
            self.opt.load_state_dict(state.optimizer)
            self.gen.set_state(_tensor(state.generator))
        else:
            state.lr = cfg.lr
        for group in self.opt.param_groups:
            group["lr"] = state.lr

    def snapshot(self) -> None:
        s = self.state
        s.model = _clone(self.model.state_dict())
        s.optimizer = _clone(self.opt.state_dict())
        s.generator = self.gen.get_state()

    def rollback(self) -> None:
        s = self.state
        self.model.load_state_dict(s.model)
        self.opt.load_state_dict(s.optimizer)
        self.gen.set_state(_tensor(s.generator))
        s.lr *= self.cfg.lr_backoff
        for group in self.opt.param_groups:
            group["lr"] = s.lr

    def clip_gradients(self, loss: torch.Tensor) -> bool:
        """Clip the global gradient norm to train.grad_clip in place (clip_grad_norm_'s math);
        False if the loss or a gradient is non-finite."""
        grads = [p.grad for p in self.params if p.grad is not None]
        # the norm and loss read on the host; scaling only when needed (a factor of 1 is a no-op):
        # a third of the CPU time of clip_grad_norm_, which is several per cent of a small step
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if not math.isfinite(norm + float(loss.detach())):
            return False
        if norm + 1e-6 > self.cfg.grad_clip:
            coef = self.cfg.grad_clip / (norm + 1e-6)
            for g in grads:
                g.mul_(coef)
        return True

    def run_epoch(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, float] | None:
        """One pass over a fresh permutation; None if a loss or gradient was non-finite."""
        cfg, model, opt = self.cfg, self.model, self.opt
        n, step = x.shape[0], self.state.step
        perm = torch.randperm(n, generator=self.gen, device=self.device)
        xs, ms = x[perm], None if mask is None else mask[perm]
        recon: list[torch.Tensor] = []  # (B,) per step, summed once per epoch
        kl: list[torch.Tensor] = []
        beta = kl_weight(step, cfg.beta, cfg.kl_warmup_steps)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        for i in range(0, n, cfg.batch_size):
            beta = kl_weight(step, cfg.beta, cfg.kl_warmup_steps)
            with autocast:
                t = loss_terms(model, xs[i : i + cfg.batch_size], None if ms is None else ms[i : i + cfg.batch_size], cfg.mc_samples, self.gen)
            loss = -(t.recon - beta * t.kl).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not self.clip_gradients(loss):
                log.warning("non-finite loss or gradient at step %d (lr %.3g)", step, self.state.lr)
                return None
            opt.step()
            step += 1
            recon.append(t.recon.detach())
            kl.append(t.kl.detach())
        self.state.step = step
        return torch.stack([torch.cat(recon).sum(), torch.cat(kl).sum()]) / n, beta


def fit(
    model: VAE,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    y_val: torch.Tensor | None = None,
    resume: TrainState | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
) -> FitResult:
    """Maximize the ELBO of rows y (N, D, original units) with Adam; see TrainConfig.

    Without y_val, train.val_fraction of y is held out for early stopping on validation ELBO,
    which starts counting once the KL warm-up is over. The model ends with the best weights.
    """
    check_values(y, model.spec.names, model.spec.missing)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    model.to(device).train()
    if y_val is None and cfg.val_fraction > 0:
        train_idx, val_idx = _split(y.shape[0], cfg)
        y, y_val = y[train_idx], y[val_idx]
    if y_val is not None:
        check_values(y_val, model.spec.names, model.spec.missing)
    x, mask = model.standardize(y.to(device, torch.float32))
    val = None if y_val is None else model.standardize(y_val.to(device, torch.float32))

    state = resume if resume is not None else TrainState()
    trainer = _Trainer(model, cfg, device, state)
    if not state.model:
        trainer.snapshot()
    rollbacks, stopped = 0, False
    while state.epoch < cfg.epochs and not state.finished:
        t0 = time.perf_counter()
        out = trainer.run_epoch(x, mask)
        if out is None:
            rollbacks += 1
            if rollbacks > cfg.max_rollbacks:
                trainer.rollback()  # leave finite weights behind
                raise TrainingDivergedError(
                    f"loss or gradient stayed non-finite in epoch {state.epoch + 1} after "
                    f"{cfg.max_rollbacks} rollbacks (lr lowered to {state.lr:.3g}); check the table "
                    "for extreme values or lower train.lr"
                )
            trainer.rollback()
            log.warning("rolled back to the end of epoch %d; lr lowered to %.3g", state.epoch, state.lr)
            continue
        rollbacks = 0
        means, beta = out
        stats = _finish_epoch(trainer, val, beta, means, time.perf_counter() - t0)
        stopped = state.finished
        if on_epoch is not None:
            on_epoch(stats)
        if on_checkpoint is not None:
            on_checkpoint(state)
    state.finished = True
    model.load_state_dict(state.best_model or state.model)
    model.eval()
    history = tuple(EpochStats(**h) for h in state.history)
    return FitResult(history, state.best_epoch or state.epoch, stopped, state)


def _finish_epoch(
    trainer: _Trainer,
    val: tuple[torch.Tensor, torch.Tensor | None] | None,
    beta: float,
    means: torch.Tensor,
    seconds: float,
) -> EpochStats:
    """Validate, track the best weights, decide on early stopping, snapshot."""
    state, cfg, model = trainer.state, trainer.cfg, trainer.model
    state.epoch += 1
    recon, kl = (float(v) for v in means.cpu())
    v: LossTerms | None = None
    if val is not None:
        model.eval()
        v = _mean_terms(model, val[0], val[1], cfg, cfg.seed + 1)  # same eps every epoch
        model.train()
    warm = state.step >= cfg.kl_warmup_steps
    if v is None:  # nothing held out: the last epoch's weights are the result
        state.best_epoch = state.epoch
    elif not warm or float(v.elbo) > state.best_val:
        state.best_val = float(v.elbo) if warm else float("-inf")
        state.best_epoch, state.bad_epochs = state.epoch, 0
        state.best_model = _clone(model.state_dict())
    else:
        state.bad_epochs += 1
        if state.bad_epochs >= cfg.early_stopping_patience:
            state.finished = True
    stats = EpochStats(
        epoch=state.epoch, step=state.step, beta=beta, lr=state.lr,
        train_elbo=recon - kl, train_recon=recon, train_kl=kl,
        val_elbo=None if v is None else float(v.elbo),
        val_recon=None if v is None else float(v.recon),
        val_kl=None if v is None else float(v.kl),
        seconds=seconds,
    )
    state.history.append(asdict(stats))
    trainer.snapshot()
    return stats
