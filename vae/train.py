"""Fit a VAE on in-memory tensors: Adam on the negative ELBO, resumable, guarded against NaN."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from vae import distributed as data_parallel
from vae.config import DeviceName, TrainConfig
from vae.elbo import LossTerms, kl_weight, log_weights
from vae.errors import ConfigError, DataError, TrainingDivergedError
from vae.init import has_linear_start, init_linear_gaussian
from vae.model import VAE
from vae.precision import resolve_precision
from vae.step import SUMMED, StepRunner, make_optimizer, resolve_compile, resolve_cuda_graph
from vae.table import check_values
from vae.terms import split_values

log = logging.getLogger(__name__)
CALIBRATION_SEED_OFFSET = 7919  # calibration_split's generator: train.seed + this
REFIT_AUTO_ROWS = 10_000  # train.refit auto: a refit on tables of fewer rows (all rows: fit's y_all)


def resolve_device(name: DeviceName, key: str = "train.device") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} is 'cuda' but no CUDA device is available; use auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based count of finished epochs
    step: int
    beta: float
    lr: float
    # vae.terms.history_columns(), in its order (tests/test_loss_terms.py): split_values fills them
    train_elbo: float
    train_recon: float
    train_kl: float
    val_elbo: float | None
    val_recon: float | None
    val_kl: float | None
    # IWAE_K of the validation rows (train.val_iw_samples draws a row): what early stopping compares
    # (a run checkpointed by older code has none)
    val_log_likelihood: float | None = None
    seconds: float = 0.0
    phase: str = "select"  # select: training rows, early stopping on validation; refit: all rows
    total_epoch: int = 0  # 1-based count over both stages: the x axis of the curves
    stage_epochs: int = 0  # the most epochs this stage runs: train.epochs, or the refit's chosen count
    noise_opened: bool = False  # model.noise_by_z: the z-dependent noise scales open after this epoch
    stage_over: bool = False  # the stage's last epoch (its count reached, or early stopping)


@dataclass
class TrainState:
    """Everything a run needs to continue bit for bit; saved with torch.save(weights_only-safe)."""

    epoch: int = 0
    step: int = 0
    lr: float = 0.0
    best_val: float = float("-inf")  # the best candidate's validation log-likelihood (Validated)
    best_epoch: int = 0
    bad_epochs: int = 0
    finished: bool = False  # the current stage is over before its count (patience after the last fall, or non-finite epochs); fit() ends with it set
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    best_model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    generator: torch.Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    phase: str = "select"  # "refit" once the selection is over and train.refit retrains on all rows
    selected_epoch: int = 0  # the epoch count early stopping chose (the refit's length)
    stopped_early: bool = False
    selected_val: float = float("-inf")  # the selection's best validation log-likelihood and its weights: the
    selected_model: dict[str, torch.Tensor] = field(default_factory=dict)  # refit must not end below them
    noise_open_epoch: int = 0  # model.noise_by_z: the epoch after which the selection opened the head
    decay_epochs: list[int] = field(default_factory=list)  # the selection's epochs after which lr decayed
    refit_start: str = ""  # the refit's train.refit_start (selected | init); "" in the selection
    start_train_elbo: float = float("-inf")  # the stage's start on its training rows: see _collapsed
    best_live_val: float = float("-inf")  # train.patience_on live: the last step's weights' best validation figure

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


def capped_rows(n: int, fraction: float, most: int) -> int:
    """round(n * fraction) rows (half to even), at most `most` (0: no limit): the validation and
    calibration rows of fit() and of the prepare stage's val split."""
    rows = round(n * fraction)
    return min(rows, most) if most else rows


def validation_count(n: int, cfg: TrainConfig) -> int:
    """Rows of n that fit() holds out for early stopping without a y_val: train.val_fraction, at
    most train.val_max_rows."""
    return capped_rows(n, cfg.val_fraction, cfg.val_max_rows)


def calibration_count(n: int, cfg: TrainConfig) -> int:
    """Rows of n kept for calibration: train.calibration_fraction, at most train.calibration_max_rows."""
    return capped_rows(n, cfg.calibration_fraction, cfg.calibration_max_rows)


def _split(n: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    n_val = validation_count(n, cfg)
    if cfg.val_fraction > 0 and (n_val < 1 or n - n_val < 1):
        raise DataError(f"train.val_fraction {cfg.val_fraction} of {n} rows leaves an empty split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    return perm[n_val:], perm[:n_val]


def _tensor(t: torch.Tensor | None) -> torch.Tensor:
    assert t is not None, "a snapshot always holds the generator state"
    return t


def _clone(tree: Any, into: Any = None) -> Any:
    """A deep copy of tree (a state dict: tensors in dicts and lists), written into the tensors of
    `into`, an earlier copy of the same structure, where they match: an epoch's snapshot then
    allocates nothing (deepcopy took a fifth of concrete's training under cProfile)."""
    if isinstance(tree, torch.Tensor):
        if (isinstance(into, torch.Tensor) and into.shape == tree.shape and into.dtype == tree.dtype
                and into.device == tree.device):
            return into.copy_(tree)
        return tree.detach().clone()
    if isinstance(tree, dict):
        old = into if isinstance(into, dict) else {}
        out = type(tree)((k, _clone(v, old.get(k))) for k, v in tree.items())
        if hasattr(tree, "_metadata"):  # a module's state dict: its version record, built anew by each state_dict()
            out._metadata = tree._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(tree, list | tuple):
        olds: list[Any] = list(into) if isinstance(into, list | tuple) and len(into) == len(tree) else [None] * len(tree)
        return type(tree)(_clone(v, o) for v, o in zip(tree, olds, strict=True))
    return copy.deepcopy(tree)


# rows x draws of one validation pass at most (train.val_iw_samples 25 on up to 163 validation rows, 4
# draws on 1,000, where 25 made randhie's epochs a third dearer for 0.04 nats/row), and of each chunk
# it scores at a time (one draw on more rows, train.val_max_rows 0)
VALIDATION_DRAWS = 4096


@dataclass(frozen=True)
class Validated:
    """Rows scored at K draws of z a row (vae.elbo.log_weights): the ELBO's terms, means over the
    rows and the draws, and the IWAE_K estimate of the rows' mean log-likelihood, a bound that is
    at least the ELBO and rises with K towards log p(y)."""

    terms: LossTerms
    log_likelihood: float


def validation_draws(cfg: TrainConfig, rows: int) -> int:
    """Draws of z per validation row: train.val_iw_samples, at most VALIDATION_DRAWS / rows (>= 1)."""
    return max(1, min(cfg.val_iw_samples, VALIDATION_DRAWS // max(rows, 1)))


@torch.no_grad()
def _validated(model: VAE, x: torch.Tensor, mask: torch.Tensor | None, draws: int, seed: int) -> Validated:
    """The validation figures with the KL sampled, at `draws` fixed draws a row (the seed's): at the
    linear start q is the exact posterior, every log weight is log p(y) and both figures are exact,
    so the start, later epochs and the refit's start compare without Monte Carlo noise where they
    are closest; the same draws every epoch."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    recon, kl, ll = [], [], []
    rows = max(1, VALIDATION_DRAWS // draws)
    for i in range(0, x.shape[0], rows):
        m = None if mask is None else mask[i : i + rows]
        r, k = log_weights(model, x[i : i + rows], m, draws, gen)  # (K, B) each
        recon.append(r.mean(0))
        kl.append(k.mean(0))
        ll.append(torch.logsumexp((r - k).double(), 0) - math.log(draws))
    return Validated(LossTerms(torch.cat(recon).mean(), torch.cat(kl).mean()), float(torch.cat(ll).mean()))


class _Trainer:
    """Holds the run's mutable pieces; one instance per fit() call."""

    def __init__(self, model: VAE, cfg: TrainConfig, device: torch.device, state: TrainState,
                 compiled: bool = False):
        """compiled: full-size steps run torch.compile's code (vae.step.resolve_compile)."""
        self.model, self.cfg, self.device, self.state = model, cfg, device, state
        graph = resolve_cuda_graph(cfg.cuda_graph, device, data_parallel.current().world_size)
        self.opt = make_optimizer(list(model.parameters()), cfg)  # the parameters become views of its flat buffer
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.precision = resolve_precision(cfg.precision, device)
        if state.model:
            model.load_state_dict(state.model)
            self.opt.load_state_dict(state.optimizer)
            self._restore_generator(_tensor(state.generator))
        else:  # a fresh stage: the selection at train.lr, a refit from the selected weights at the lr it ended at
            state.lr = state.lr or cfg.effective_lr
        self.opt.set_lr(state.lr)
        self.runner = StepRunner(model, self.opt, cfg, device, self.precision, graph, compiled)
        self._modules = list(model.modules())
        # the model's weights and buffers: views that stay valid for the trainer's life (FlatAdam's
        # views; loads, the noise gate and rollbacks write in place)
        self._live = model.state_dict()

    def set_training(self, training: bool) -> None:
        """model.train(training) without its recursion and nn.Module's __setattr__ (a third of a
        millisecond, twice an epoch)."""
        for m in self._modules:
            m.__dict__["training"] = training

    def copy_weights(self, into: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's state dict copied into `into`, an earlier copy, in place where it matches
        (_clone), without a state_dict() walk: this runs once or twice an epoch."""
        return _clone(self._live, into)

    def validate(self, val: tuple[torch.Tensor, torch.Tensor | None]) -> Validated:
        """The validation figures of the weights the parameters hold now, in eval mode, at
        validation_draws draws a row; the same draws every epoch (seed + 1)."""
        self.set_training(False)
        draws = validation_draws(self.cfg, val[0].shape[0])
        scored = _validated(self.model, val[0], val[1], draws, self.cfg.seed + 1)
        self.set_training(True)
        return scored

    def _restore_generator(self, saved: torch.Tensor) -> None:
        """The noise stream of the checkpoint; a CPU and a CUDA generator keep states of other sizes."""
        if saved.numel() != self.gen.get_state().numel():
            raise ConfigError(f"the checkpoint's noise generator is not a {self.device.type} one: the run was "
                              f"interrupted on another device; resume it with the train.device it ran on")
        self.gen.set_state(saved)

    def snapshot(self) -> None:
        s = self.state
        s.model = self.copy_weights(s.model)
        s.optimizer = _clone(self.opt.state_dict(), s.optimizer)
        s.generator = self.gen.get_state()

    def rollback(self) -> None:
        s = self.state
        self.model.load_state_dict(s.model)
        self.opt.load_state_dict(s.optimizer)  # in place: a captured graph stays valid
        self.gen.set_state(_tensor(s.generator))
        self.set_lr(s.lr * self.cfg.lr_backoff)

    def set_lr(self, lr: float) -> None:
        """A new learning rate from the next step on (written into Adam's lr tensor: a CUDA graph reads it)."""
        self.state.lr = lr
        self.opt.set_lr(lr)

    def run_epoch(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, float] | None:
        """One pass over a fresh permutation; None if a loss or gradient was non-finite.

        Nothing is read back to the host until the epoch's end: eps are drawn per batch outside
        the step (the draws of the eager loop, in the same order), clipping and the finite check
        stay on the device.
        """
        cfg, n, step, k = self.cfg, x.shape[0], self.state.step, self.model.latent_dim
        perm = torch.randperm(n, generator=self.gen, device=self.device)
        xs, ms = x[perm], None if mask is None else mask[perm]
        bounds = batch_bounds(n, cfg.batch_size)
        betas = [kl_weight(step + i, cfg.beta, cfg.kl_warmup_steps) for i in range(len(bounds))]
        step_fn, gen, device = self.runner.step, self.gen, self.device
        warmup = 0 if self.state.refit_start == "selected" else warmup_steps(cfg, len(bounds))  # trained weights: no ramp
        self.runner.sums.zero_()
        for i, (beta, (a, b)) in enumerate(zip(betas, bounds, strict=True)):
            xb = xs[a:b]
            shape = (xb.shape[0], k) if cfg.mc_samples == 1 else (cfg.mc_samples, xb.shape[0], k)
            eps = torch.randn(shape, generator=gen, device=device)  # (B, K) or (M, B, K)
            if warmup and step + i <= warmup:  # the stage's first steps: lr ramps up
                self.opt.set_lr(self.state.lr * min(1.0, (step + i + 1) / warmup))
            step_fn(xb, None if ms is None else ms[a:b], eps, beta)
        *sums, check = self.runner.sums.tolist()  # the epoch's one read: the SUMMED terms, then the check
        if not math.isfinite(check):
            log.warning("non-finite loss or gradient in epoch %d (lr %.3g)", self.state.epoch + 1, self.state.lr)
            return None
        self.state.step = step + len(bounds)
        return torch.tensor(sums) / n, betas[-1]


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """An epoch's batches over n (permuted) rows, as (start, stop): batch_size rows each, the
    remainder its own last batch when it is at least half a batch, else the previous batch takes it
    (a batch of up to 1.5 batch_size rows). Adam moves the weights about as far on a step of a few
    rows as on a full one, along a far noisier gradient: wine's refit (143 rows) took a step of 128
    rows and one of 15 each epoch, half the refit's steps and a third of the run's. Every row is in
    exactly one batch."""
    if n <= batch_size:
        return [(0, n)]
    stops = list(range(batch_size, n, batch_size)) + [n]
    if n - stops[-2] < batch_size / 2:  # the short remainder joins the batch before it
        del stops[-2]
    return list(zip([0, *stops[:-1]], stops, strict=True))


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The steps of a stage's lr ramp: train.lr_warmup_steps, at most train.lr_warmup_epochs epochs of
    steps_per_epoch (0: no cap). 500 steps protect the closed-form start of wide tables from Adam's
    first full-size steps (cells, leaf: 9 steps an epoch); on a table of a few hundred rows they are
    hundreds of epochs, the run's whole selection at a fraction of the lr."""
    if cfg.lr_warmup_epochs:
        return min(cfg.lr_warmup_steps, cfg.lr_warmup_epochs * steps_per_epoch)
    return cfg.lr_warmup_steps


def fit(
    model: VAE,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    y_val: torch.Tensor | None = None,
    y_refit_extra: torch.Tensor | None = None,
    resume: TrainState | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
) -> FitResult:
    """Maximize the ELBO of rows y (N, D, original units) with Adam; see TrainConfig.

    Two stages, each run by _run_stage from its start (or a checkpoint) through _loop's epochs:
    the selection trains on y and chooses its weights by their validation figure (Validated; without
    y_val, train.val_fraction of y is held out), patience counting once the KL warm-up is over; its
    plateaus open the noise head, lower the lr, then end it (_schedule). With train.refit the
    refit then trains on all rows (y, the validation rows and y_refit_extra), as _start_refit
    plans it (train.refit_start), and the model ends with its weights; else with the selection's.

    y_refit_extra: rows only the refit trains on; neither the selection's training nor early
    stopping sees them, so they stay out of sample for the selected model (selection_model), e.g.
    to calibrate on. They are refused when no refit will run (will_refit), where no model would
    train on them.
    """
    check_values(y, model.spec.names, model.spec.missing)
    rows = sum(t.shape[0] for t in (y, y_val, y_refit_extra) if t is not None)  # all of them: the refit's
    if y_refit_extra is not None:
        check_values(y_refit_extra, model.spec.names, model.spec.missing)
        if not will_refit(model, cfg, y_val is not None or cfg.val_fraction > 0, rows):
            raise ConfigError("fit() was given rows for the refit only (y_refit_extra), but no refit will run "
                              "(train.refit, train.init linear_gaussian with a linear start, validation rows)")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    model.to(device).train()
    y_all = y
    if y_val is None and cfg.val_fraction > 0:
        train_idx, val_idx = _split(y.shape[0], cfg)
        y, y_val = y[train_idx], y[val_idx]
    elif y_val is not None:
        check_values(y_val, model.spec.names, model.spec.missing)
        y_all = torch.cat([y, y_val.to(y)])
    if y_refit_extra is not None:
        y_all = torch.cat([y_all, y_refit_extra.to(y_all)])
    linear_start = cfg.init == "linear_gaussian" and has_linear_start(model)
    if cfg.init == "linear_gaussian" and not linear_start:
        log.warning("train.init linear_gaussian needs an affine model or model.linear_path: starting "
                    "from torch's random weights (and without train.refit)")
    refit = will_refit(model, cfg, y_val is not None, rows)
    cfg = data_parallel.per_rank(cfg)  # under torchrun: batch_size / world_size rows a step on each rank
    val = None if y_val is None else model.standardize(y_val.to(device, torch.float32))  # all of them

    state = resume if resume is not None else TrainState()
    save = _Checkpoints(on_checkpoint, cfg.checkpoint_every_s)
    if state.phase == "select":  # early stopping on the validation rows chooses the weights
        # the closed-form start from all training rows: the same start however many ranks
        start = (lambda m: init_linear_gaussian(m, y)) if linear_start else None
        _run_stage(model, cfg, device, state, y, val, start, on_epoch, save, last_stage=not refit)
        state.stopped_early, state.selected_epoch = state.finished, state.best_epoch
        if refit:
            state = _start_refit(state, cfg)
            save(state, force=True)  # the selection's outcome
    if state.phase == "refit":  # all rows, as _start_refit planned it
        assert val is not None, "a refit has validation rows"
        selected = state.selected_model
        start = ((lambda m: m.load_state_dict(selected)) if state.refit_start == "selected"
                 else (lambda m: init_linear_gaussian(m, y_all)))
        _run_stage(model, cfg, device, state, y_all, val, start, on_epoch, save, last_stage=True)
        _keep_selection_unless_refit_holds(state)
    state.finished = True
    model.load_state_dict(state.best_model or state.model)
    model.eval()
    history = tuple(EpochStats(**h) for h in state.history)
    return FitResult(history, state.selected_epoch if state.phase == "refit" else state.best_epoch,
                     state.stopped_early, state)


def _run_stage(
    model: VAE,
    cfg: TrainConfig,
    device: torch.device,
    state: TrainState,
    rows: torch.Tensor,
    val: tuple[torch.Tensor, torch.Tensor | None] | None,
    start: Callable[[VAE], Any] | None,
    on_epoch: Callable[[EpochStats], None] | None,
    save: _Checkpoints,
    last_stage: bool,
) -> None:
    """One stage (the selection or the refit) on rows (N, D, original units), from its start or
    from where a checkpoint left it: `start` puts the stage's first weights in the model (None:
    the model's own, e.g. torch's random ones); that start is the first candidate on validation.
    last_stage: the run's last, whose end is always checkpointed (a refit's start is, instead)."""
    fresh = not state.model
    if fresh and start is not None:
        start(model)
    x, mask = model.standardize(data_parallel.shard(rows).to(device, torch.float32))  # this rank's rows
    trainer = _Trainer(model, cfg, device, state, resolve_compile(cfg.compile, device, x.shape[0], cfg.batch_size))
    data_parallel.attach(trainer, cfg.seed, state.step)  # rank 0's weights; gradients averaged each step
    if fresh:
        trainer.snapshot()
        if val is not None:  # training never ends below the start on validation
            _start_candidate(trainer, x, mask, val)
    _loop(trainer, x, mask, val, _stage_epochs(state, cfg), on_epoch, save, last_stage)
    trainer.opt.release()  # the parameters keep no gradient views once the stage is over


class _Checkpoints:
    """When fit() hands its state to on_checkpoint: after the run's first epoch (a run is resumable
    at once), then once train.checkpoint_every_s has passed since the last, and (force) at the
    refit's start and the run's end; the selection's end is the refit's start, written once."""

    def __init__(self, on_checkpoint: Callable[[TrainState], None] | None, every_s: float):
        self.on_checkpoint, self.every_s, self.last = on_checkpoint, every_s, -math.inf

    def __call__(self, state: TrainState, force: bool = False) -> None:
        if self.on_checkpoint is not None and (force or time.monotonic() - self.last >= self.every_s):
            self.on_checkpoint(state)
            self.last = time.monotonic()


def will_refit(model: VAE, cfg: TrainConfig, validation_rows: bool, rows: int) -> bool:
    """Whether fit() retrains on all rows after the selection: train.refit (auto: on tables of
    fewer than REFIT_AUTO_ROWS rows, `rows` counting all of them: training, validation and
    calibration), a closed-form linear start (train.init linear_gaussian on a model that has one)
    and validation rows (a y_val, or train.val_fraction > 0)."""
    wanted = rows < REFIT_AUTO_ROWS if cfg.refit == "auto" else cfg.refit
    return bool(wanted) and cfg.init == "linear_gaussian" and has_linear_start(model) and validation_rows


def calibration_split(n: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(rest, calibration): indices of n rows, calibration_count of them for calibration, drawn
    from train.seed by their own generator (seed + CALIBRATION_SEED_OFFSET), so the same rows on
    every rank, on --resume, and apart from fit()'s validation split, which is taken from the rest."""
    n_cal = calibration_count(n, cfg)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + CALIBRATION_SEED_OFFSET))
    return perm[n_cal:].sort().values, perm[:n_cal].sort().values


def held_out_rows(y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor | None:
    """The rows of y that fit() holds out for early stopping when it is given no y_val (None: none)."""
    if cfg.val_fraction <= 0:
        return None
    return y[_split(y.shape[0], cfg)[1]]


def selection_model(model: VAE, result: FitResult) -> VAE:
    """The model early stopping chose on the held-out rows, which it never trained on: `model`
    itself, or after train.refit (which trains on those rows too) a copy with the selection's weights."""
    if result.state.phase != "refit" or not result.state.selected_model:
        return model
    chosen = copy.deepcopy(model)
    chosen.load_state_dict(result.state.selected_model)
    return chosen.eval()


def _start_refit(state: TrainState, cfg: TrainConfig) -> TrainState:
    """A run on all rows; the selection's record is kept. train.refit_start selected: from the
    selected weights (their noise head as it was) at the selection's last lr; init, or where the
    selection's start was its best candidate: from the closed-form start of all rows for the chosen
    epoch count (0: that start is the result), opening the head and lowering the lr after the same
    epochs as the selection."""
    selected = state.best_model or state.model
    start = cfg.refit_start if state.best_epoch else "init"  # no epoch beat the start: its all-rows counterpart
    if start == "selected":
        opened, decays, lr = 0, [], state.lr
    else:
        opened = state.noise_open_epoch if state.noise_open_epoch < state.best_epoch else 0
        decays, lr = [e for e in state.decay_epochs if e < state.best_epoch], 0.0
    return TrainState(history=state.history, phase="refit", selected_epoch=state.best_epoch,
                      stopped_early=state.stopped_early, selected_val=state.best_val, selected_model=selected,
                      noise_open_epoch=opened, decay_epochs=decays, lr=lr, refit_start=start)


def _stage_epochs(state: TrainState, cfg: TrainConfig) -> int:
    """The most epochs the current stage runs: train.epochs for the selection; for the refit
    train.refit_epochs from the selected weights, else the selection's chosen count."""
    if state.phase == "select":
        return cfg.epochs
    return cfg.refit_epochs if state.refit_start == "selected" else state.selected_epoch


def _keep_selection_unless_refit_holds(state: TrainState) -> None:
    """The refit keeps its best epoch by the validation log-likelihood of the rows it trains on too, so a
    noisy last epoch is not the result; if even that is below the selection's out-of-sample
    validation log-likelihood, the refit went wrong (a spike, a collapse) and the selected weights stay."""
    if state.best_val < state.selected_val:
        log.warning("the refit on all rows ended below the selected model on the validation rows "
                    "(%.4g < %.4g nats/row): keeping the selected weights", state.best_val, state.selected_val)
        state.best_model = state.selected_model


def _loop(
    trainer: _Trainer,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    val: tuple[torch.Tensor, torch.Tensor | None] | None,
    epochs: int,
    on_epoch: Callable[[EpochStats], None] | None,
    save: _Checkpoints,
    last_stage: bool,
) -> None:
    """Epochs until `epochs` or early stopping; a non-finite epoch rolls back and lowers the lr.

    An epoch still non-finite after train.max_rollbacks ends the stage where a validated candidate
    exists (its best weights are kept, as early stopping would); without validation rows it raises."""
    state, cfg = trainer.state, trainer.cfg
    rollbacks = 0
    while state.epoch < epochs and not state.finished:
        t0 = time.perf_counter()
        out = trainer.run_epoch(x, mask)
        if out is None:
            rollbacks += 1
            if rollbacks > cfg.max_rollbacks:
                trainer.rollback()  # leave finite weights behind
                if val is None or not state.best_model:
                    raise TrainingDivergedError(
                        f"loss or gradient stayed non-finite in epoch {state.epoch + 1} after "
                        f"{cfg.max_rollbacks} rollbacks (lr lowered to {state.lr:.3g}); check the table "
                        "for extreme values or lower train.lr"
                    )
                log.warning("loss or gradient stayed non-finite in epoch %d after %d rollbacks (lr lowered to "
                            "%.3g): this stage ends with its best weights on validation (epoch %d)",
                            state.epoch + 1, cfg.max_rollbacks, state.lr, state.best_epoch)
                state.finished = True
                save(state, force=last_stage)
                break
            trainer.rollback()
            log.warning("rolled back to the end of epoch %d; lr lowered to %.3g", state.epoch, state.lr)
            continue
        rollbacks = 0
        means, beta = out
        stats = _finish_epoch(trainer, val, beta, data_parallel.average(means, x.shape[0]), time.perf_counter() - t0)
        state.finished = data_parallel.agree(state.finished)  # rank 0's early stop on every rank
        if on_epoch is not None:
            on_epoch(stats)
        save(state, force=last_stage and (state.finished or state.epoch >= epochs))


def _start_candidate(trainer: _Trainer, x: torch.Tensor, mask: torch.Tensor | None,
                     val: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    """The stage's start: the first candidate on validation, and its ELBO on the training rows,
    against which a collapsed epoch is told (_collapsed)."""
    trainer.set_training(False)
    start = _validated(trainer.model, x, mask, trainer.cfg.mc_samples, trainer.cfg.seed + 2)
    trainer.state.start_train_elbo = float(start.terms.elbo)
    _track_best(trainer, val, warm=False)  # the start is no plateau


def _collapsed(train_elbo: float | None, start: float) -> bool:
    """An epoch whose mean training ELBO fell below the stage's start by more than 1 nat/row plus 5 %:
    its weights passed through a blow-up (diamonds, 2 epochs: -15,262 after -13.1), and even when
    they score well on the validation rows they are not kept (they scored -30.66 on test rows, below
    the start's -17.41). Training from the start only climbs: a sound epoch is not near that bound."""
    return train_elbo is not None and train_elbo < start - (1.0 + 0.05 * abs(start))


def _track_best(trainer: _Trainer, val: tuple[torch.Tensor, torch.Tensor | None], warm: bool,
                train_elbo: float | None = None) -> tuple[Validated, bool]:
    """Keep the weights with the best validation log-likelihood (Validated: IWAE at
    train.val_iw_samples draws a row) among epochs that did not collapse on their training rows
    (with train.ema_steps, the averaged weights); count patience once the warm-up is over, on the
    kept candidates' figure, or with train.patience_on live on the last step's weights'. Returns
    the candidate's validation figures and whether patience ran out (a plateau: what follows is
    _schedule's to decide)."""
    state, cfg = trainer.state, trainer.cfg
    collapsed = _collapsed(train_elbo, state.start_train_elbo)
    live_better: bool | None = None  # None: patience counts on the candidates
    if trainer.opt.ema is not None and cfg.patience_on == "live" and state.phase == "select":  # the refit never stops early
        # the schedule of a run without the average, to the epoch: a collapsed epoch is no improvement
        live = trainer.validate(val).log_likelihood
        live_better = not collapsed and live > state.best_live_val
        if live_better:
            state.best_live_val = live
    with trainer.opt.averaged():  # train.ema_steps: the running average is what is validated and kept
        v = trainer.validate(val)
        better = not collapsed and v.log_likelihood > state.best_val
        if better:
            state.best_model = trainer.copy_weights(state.best_model)
    if collapsed:
        log.info("epoch %d: training ELBO %.4g nats/row collapsed below the start's %.4g; its weights are "
                 "not kept", state.epoch, train_elbo, state.start_train_elbo)
    if better:
        state.best_val, state.best_epoch = v.log_likelihood, state.epoch
    if better if live_better is None else live_better:
        state.bad_epochs = 0
    elif warm:
        state.bad_epochs += 1
    return v, warm and state.bad_epochs >= cfg.early_stopping_patience


def _schedule(trainer: _Trainer, plateau: bool) -> bool:
    """What happens after an epoch besides its steps; True where the noise head opened.

    The selection answers each plateau (patience ran out) with the next of: the z-dependent noise
    scales open (model.noise_by_z: the means and the shared noise train first; at the latest after
    half of train.epochs), the lr falls by train.lr_decay (train.lr_decays times), the stage ends.
    The refit replays the selection's openings and falls after the same epochs and never ends early.
    """
    state, cfg, dec = trainer.state, trainer.cfg, trainer.model.decoder
    if state.phase == "refit":  # noise_open_epoch, decay_epochs: the selection's (0, []: never)
        opens, falls = dec.by_z and state.epoch == state.noise_open_epoch, state.epoch in state.decay_epochs
    else:
        opens = dec.by_z and not state.noise_open_epoch and (plateau or state.epoch == cfg.epochs // 2)
        falls = plateau and not opens and len(state.decay_epochs) < cfg.lr_decays
        state.finished = plateau and not opens and not falls
        if opens or falls:
            state.bad_epochs = 0  # fresh patience
        if opens:
            state.noise_open_epoch = state.epoch
        if falls:
            state.decay_epochs.append(state.epoch)
    if opens:
        dec.noise_gate.fill_(1.0)
    if falls:
        trainer.set_lr(state.lr * cfg.lr_decay)  # from the next epoch on
    return bool(opens)


def _finish_epoch(
    trainer: _Trainer,
    val: tuple[torch.Tensor, torch.Tensor | None] | None,
    beta: float,
    means: torch.Tensor,
    seconds: float,
) -> EpochStats:
    """Validate, track the best weights, decide on early stopping, snapshot."""
    state, cfg = trainer.state, trainer.cfg
    state.epoch += 1
    # the SUMMED terms' means; in float64, so that the ELBO is recon - kl of the reported floats
    train = LossTerms(**dict(zip(SUMMED, means.cpu().double(), strict=True)))
    v: Validated | None = None
    plateau = False
    if val is None:  # nothing held out: the last epoch's weights (their average, train.ema_steps) are the result
        if state.phase == "select":
            state.best_epoch = state.epoch
        if trainer.opt.ema is not None:
            with trainer.opt.averaged():
                state.best_model = trainer.copy_weights(state.best_model)
    else:  # the refit tracks its best epoch but never stops early: it runs the chosen count
        v, plateau = _track_best(trainer, val, warm=state.phase == "select" and state.step >= cfg.kl_warmup_steps,
                                 train_elbo=float(train.elbo))
    lr = state.lr  # the epoch's; a fall applies from the next
    opened = _schedule(trainer, plateau)
    stage_epochs = _stage_epochs(state, cfg)
    stats = EpochStats(
        epoch=state.epoch, step=state.step, beta=beta, lr=lr,
        **split_values("train", train),
        **split_values("val", None if v is None else v.terms),
        val_log_likelihood=None if v is None else v.log_likelihood,
        seconds=seconds,
        phase=state.phase,
        total_epoch=len(state.history) + 1,
        stage_epochs=stage_epochs,
        noise_opened=opened,
        stage_over=state.finished or state.epoch >= stage_epochs,
    )
    state.history.append(asdict(stats))
    trainer.snapshot()
    return stats
