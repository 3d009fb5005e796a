"""Typed, frozen options of the model and of training. Each field declares its default and its help
(`setting`): the one description of the key, from which params files and their docs are written."""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar, get_args, get_origin

from vae.errors import ConfigError

Likelihood = Literal["gaussian", "bernoulli", "auto"]
DecoderVariance = Literal["fixed", "shared", "per_feature", "heteroscedastic", "full", "lowrank"]
Activation = Literal["relu", "silu", "tanh", "elu"]
MissingPolicy = Literal["reject", "mask"]
DeviceName = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]
LrScaling = Literal["none", "sqrt", "linear"]
Init = Literal["linear_gaussian", "random"]
RefitStart = Literal["selected", "init"]
Refit = Literal["auto", True, False]
CudaGraph = Literal["auto", True, False]
Compile = Literal["auto", True, False]
PatienceOn = Literal["live", "average"]
T = TypeVar("T")


def setting(default: T, help: str) -> T:
    """A config field: its built-in default and what it does, in a line or a few (a string's
    choices are its Literal annotation's and go unsaid)."""
    return field(default=default, metadata={"help": help})


def _spelled(option: Any) -> str:
    """An option as params.yaml spells it (true/false, not True/False)."""
    return str(option).lower() if isinstance(option, bool) else str(option)


def _options(allowed: tuple[Any, ...]) -> str:
    return ", ".join(_spelled(a) for a in allowed)


def choices(kind: Any) -> tuple[str, ...]:
    """A Literal annotation's options as params.yaml spells them; () for any other annotation."""
    return tuple(_spelled(a) for a in get_args(kind)) if get_origin(kind) is Literal else ()


def check_choice(section: str, key: str, value: object, options: Any) -> None:
    """ConfigError naming SECTION.KEY unless value is one of the Literal type options."""
    allowed = get_args(options)
    if not any(value is a if isinstance(a, bool) else value == a for a in allowed):  # 1 is not true
        raise ConfigError(f"{section}.{key} is {value!r}; choose one of {_options(allowed)}")


def _check_positive(section: str, key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{key} is {value!r}; it must be {bound}")


@dataclass(frozen=True)
class ModelConfig:
    # 8: small enough to read; measured on breast_cancer, bfi, leaf (benchmarks/quality.py)
    latent_dim: int = setting(8, "size of z")
    hidden_dims: tuple[int, ...] = setting(
        (128, 128), "encoder and decoder layers ([] = affine: pPCA / factor analysis / full Gaussian)")
    likelihood: Likelihood = setting(
        "auto", "the density of the columns; auto: binary {0,1} columns get a Bernoulli, the rest a Gaussian")
    decoder_variance: DecoderVariance = setting(
        "full", "the noise of the real columns; full carries the correlations the latent misses, and with "
        "the linear start the model begins at the full-covariance Gaussian, the baseline every model must meet")
    fixed_sigma: float = setting(1.0, "decoder_variance fixed: the noise sd, standardized units")
    min_sigma: float = setting(
        1e-3, "floor of every noise sd (a column on a grid: at least its resolution): a continuous density "
        "on a repeated value can grow without bound")
    activation: Activation = setting("relu", "the networks' nonlinearity (relu is the fastest on the CPU)")
    noise_rank: int = setting(4, "decoder_variance lowrank: rank of the noise covariance beyond its diagonal")
    linear_path: bool = setting(
        True, "an affine path beside each MLP (mu = MLP(x) + A x + b), started at the closed-form "
        "linear-Gaussian fit: the network only has to learn what that fit misses")
    # the head opens once the means have converged (see vae.train). Measured: +0.4 to +1.9 nats/row
    # on concrete, quakes, college (tuning tables)
    noise_by_z: bool = setting(
        True, "full / lowrank (the diagonal kinds ignore it): per-column noise scales that depend on z, "
        "Sigma(z) = D(z) Sigma D(z) with D(z) = diag(exp(h(z))) from a decoder head, opened after the "
        "first stage, so the noise cannot take over what the latent should explain")
    # vae.model.MarginalTransform; measured in docs/benchmarks.md (a per-column transform)
    marginal_units: int = setting(
        0, "real columns pass through a learned monotone map g_j(x) = x + sum_k a_jk tanh(b_jk (x - c_jk)) of "
        "this many units before the Gaussian (its Jacobian is in the density, so nats/row stay in the "
        "table's units): bounded, skewed or many-valued columns made Gaussian per column; 0: none")
    # auto: vae.table.choose_log_columns
    log_columns: Any = setting(
        "auto", "none | auto | [names]: real columns modelled as log y (strictly positive ones; the density "
        "keeps the Jacobian, so nats/row stay in the table's units); auto: each positive column where that "
        "raises the validation log-likelihood of the full Gaussian")

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_dims", tuple(int(h) for h in self.hidden_dims))
        if self.latent_dim < 1:
            raise ConfigError(f"model.latent_dim is {self.latent_dim!r}; it must be >= 1")
        if any(h < 1 for h in self.hidden_dims):
            raise ConfigError(f"model.hidden_dims is {list(self.hidden_dims)}; widths must be >= 1")
        check_choice("model", "likelihood", self.likelihood, Likelihood)
        check_choice("model", "decoder_variance", self.decoder_variance, DecoderVariance)
        check_choice("model", "activation", self.activation, Activation)
        _check_positive("model", "fixed_sigma", self.fixed_sigma)
        _check_positive("model", "min_sigma", self.min_sigma)
        logs = self.log_columns
        if logs is None or logs is False:  # YAML null / a bare `no`
            logs = "none"
        if isinstance(logs, list | tuple) and all(isinstance(c, str) for c in logs):
            logs = tuple(logs)
        elif logs not in ("auto", "none"):
            raise ConfigError(f"model.log_columns is {logs!r}; choose auto, none or a list of column names")
        object.__setattr__(self, "log_columns", logs)
        if self.noise_rank < 1:
            raise ConfigError(f"model.noise_rank is {self.noise_rank!r}; it must be >= 1")
        if self.marginal_units < 0:
            raise ConfigError(f"model.marginal_units is {self.marginal_units!r}; it must be >= 0")
        if self.decoder_variance == "fixed" and self.fixed_sigma < self.min_sigma:
            raise ConfigError(
                f"model.fixed_sigma is {self.fixed_sigma!r}, below model.min_sigma {self.min_sigma!r}"
            )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(800, "epochs to train at most; with model.noise_by_z the first stage takes at most half")
    batch_size: int = setting(128, "rows a step (fast on the CPU; small enough for tables of a few hundred rows); "
                                     "an epoch's remainder under half a batch joins its last batch")
    lr: float = setting(1e-3, "Adam's learning rate after the warm-up, until the first plateau (then lr_decays)")
    mc_samples: int = setting(1, "draws of z per row in the ELBO (Kingma & Welling 2014 use 1)")
    beta: float = setting(1.0, "weight of the KL term (1: the ELBO; others trade reconstruction against KL)")
    # 0: training starts at the exact posterior of the linear fit
    kl_warmup_steps: int = setting(0, "optimizer steps over which beta ramps linearly from 0 (0: none)")
    val_fraction: float = setting(
        0.1, "rows of the training table held out for early stopping (without --val) and, without "
        "calibration rows, for the anomaly threshold")
    # randhie (16,152 rows): validation 1,000 and calibration 2,000 rows without a refit scored -1.29 /
    # -0.98 / -1.02 nats/row in 52-66 s (3 seeds), against -0.74 in 203 s with 10 % + 20 % and the
    # refit (docs/benchmarks.md)
    val_max_rows: int = setting(
        1000, "at most this many validation rows, whatever val_fraction gives (a large table needs no "
        "more to compare epochs; the rest trains); 0: no limit")
    # 25 against 1, three seeds on quality.py's split 0: +0.73 boston, +0.75 leaf, +0.99 cells, +0.41
    # quakes, 0 to +0.3 on eight more, -0.10 digits, for 1.2 to 1.7 times the seconds (longer training);
    # but breast_cancer lower: -0.18 over quality.py's splits 0-4 x two seeds, -1.6 over four seeds on
    # the pipeline's split of it (make run's; -2.8 on train.seed 0)
    val_iw_samples: int = setting(
        1, "draws of z per validation row, at most 4,096 / validation rows: early stopping compares the "
        "importance-weighted estimate of the rows' log-likelihood from them (IWAE, Burda et al. 2016), "
        "the figure evaluation reports, and the ELBO's terms are their means; 1: the mean log weight "
        "(the ELBO); 25 trains longer, to higher figures on most tables")
    # breast_cancer, quantile 0.01: 1.5 % of test rows flagged on 0.2's 82 rows, 3.7 % on the 46
    # validation rows. Without a refit no model trains on them (six tuning tables: the selection on
    # 90 % of the rows scored up to 4.9 nats/row more)
    calibration_fraction: float = setting(
        0.2, "rows of the training table kept from the selection's training and early stopping, on which "
        "the anomaly threshold is placed; only a refit trains on them (0: none, the threshold goes on the "
        "validation rows)")
    calibration_max_rows: int = setting(
        2000, "at most this many calibration rows, whatever calibration_fraction gives (20 rows below "
        "the anomaly threshold at embed.anomaly_quantile 0.01); 0: no limit")
    early_stopping_patience: int = setting(
        10, "epochs without a better validation log-likelihood (train.val_iw_samples) before the lr falls or a stage ends")
    # 1e-3 (after a warm-up), patience 10, two falls by 0.3, against the constant 3e-4 with patience
    # 40: 2 to 4 times fewer epochs on the tuning tables, held-out figures within their spread
    # (docs/benchmarks.md)
    lr_decays: int = setting(
        2, "times the lr falls (by lr_decay) where early stopping would end the selection, training going "
        "on (0: a constant lr); the refit replays the falls")
    lr_decay: float = setting(0.3, "the factor of each fall")
    lr_warmup_steps: int = setting(
        500, "the lr ramps linearly from lr / lr_warmup_steps to lr over each stage's first steps (0: full "
        "from the first): Adam's first full-size steps threw the closed-form start away on wide tables")
    # against no cap, seeds 0 and 1 (docs/benchmarks.md): wine +0.29, diabetes +0.29, boston +0.97,
    # breast_cancer +0.57 nats/row, 19-35 % fewer epochs on wine, diabetes, bdims, college, concrete;
    # quakes -0.19, concrete -0.23; 60 epochs keep the 500 steps of the wide tables (cells, leaf: 9 an epoch)
    lr_warmup_epochs: int = setting(
        60, "the ramp lasts at most this many epochs (0: no cap): on a small table 500 steps are hundreds of "
        "epochs, most of the run at a reduced lr")
    seed: int = setting(0, "weights, batches, draws, splits")
    device: DeviceName = setting("auto", "where training runs; auto: CUDA when present, else the CPU")
    num_threads: int = setting(
        1, "torch threads on the CPU (0: torch's default, one per core; one is often fastest on 2 cores)")
    # steps scaled down (benchmarks/grad_norms.py, 30 epochs): none on most tables, 37 % on randhie,
    # 35 % on diamonds, all on cells; 1e4 moved held-out figures by -0.05 to +0.78 (docs/benchmarks.md)
    grad_clip: float = setting(
        100.0, "the global gradient norm of a step is scaled down to this (never on most tables; a third of "
        "the steps on randhie and diamonds, every step on cells)")
    max_rollbacks: int = setting(
        3, "consecutive non-finite epochs rolled back (the lr lowered each time) before the stage ends with "
        "its best weights on validation (without validation rows, training fails)")
    lr_backoff: float = setting(0.5, "learning-rate factor after each rollback")
    init: Init = setting(
        "linear_gaussian", "where training starts; linear_gaussian: the closed-form linear-Gaussian fit of the "
        "training rows (exact posterior, p(y) the baseline's), so no model scores below it on validation; random: as "
        "torch initializes")
    # the refit's gain, refit=false against the default (docs/benchmarks.md): +0.02 to +3.6 nats/row on
    # the small tables (one seed of diabetes -0.88), +0.2 to +0.6 on Computers and spam7 (4,601-6,259
    # rows), +0.33 on randhie and +0.13 on diamonds, for 1.8 to 2.4 times the time: auto trades that
    # for half the time where a run takes minutes
    refit: Refit = setting(
        "auto", "after early stopping chose the weights on the validation split, train on all rows (training, "
        "validation and calibration): the held-out rows are not lost to the final model (only with init "
        "linear_gaussian and val_fraction); with calibration rows it is what gives them back to it; auto: on "
        "tables of fewer than 10,000 rows (above, val_max_rows and calibration_max_rows hold out a small "
        "share, and the refit would double the time)")
    # selected: 30-45 % fewer epochs, but 0.1 to 1.8 nats/row lower on each of the six tuning tables
    # (10 epochs; 30: 0.1 to 1.1), docs/benchmarks.md
    refit_start: RefitStart = setting(
        "init", "where the refit starts; init: the closed-form start of all rows, for the selection's epoch "
        "count, replaying its lr falls (about doubles the time); selected: the weights early stopping "
        "chose, refit_epochs epochs on all rows at the selection's last lr (no warm-up)")
    refit_epochs: int = setting(10, "refit_start selected: the epochs on all rows")
    precision: Precision = setting(
        "auto", "the networks' number format; auto: bf16 autocast on CUDA, fp32 on the CPU; bf16 runs the "
        "networks in bfloat16 (CPU too), the loss terms and log-densities stay fp32 (vae.precision_gap "
        "measures what bf16 changes)")
    # a graph covers forward, backward, clipping and fused Adam; correct: vae.step.resolve_cuda_graph
    cuda_graph: CudaGraph = setting(
        "auto", "replay each full-size training step from a CUDA graph (CUDA only), one launch instead of "
        "hundreds; auto: on CUDA wherever a graph is correct (one process), off on the CPU; true / false "
        "force it (CPU: off)")
    # randhie, diamonds (1 thread, 2 vCPUs): 1.3-1.5x less an epoch, for 20-23 s of compilation the
    # first time on a machine and 3 s a process after it (docs/benchmarks.md); a stage of fewer
    # steps would not earn that back
    compile: Compile = setting(
        "auto", "on the CPU, run each full-size step's forward and backward as code torch.compile generated "
        "(one fused kernel where eager torch runs dozens; needs a C++ compiler, else steps run eagerly with "
        "a warning); auto: on a stage of at least 64 full batches an epoch (8,192 rows at batch 128: the "
        "selection of randhie and diamonds), where the compilation pays; true / false force it (CUDA: off, graphs replay steps)")
    lr_scaling: LrScaling = setting(
        "none", "the lr of large batches: lr * (batch_size / lr_base_batch)^p with p = 1/2 (sqrt, the rule for Adam: "
        "Malladi et al. 2022) or 1 (linear); none keeps train.lr whatever the batch")
    lr_base_batch: int = setting(128, "the batch size lr is given for (lr_scaling)")
    # against 0, three seeds, mean held-out nats/row: +0.0 to +1.0 on the 13 small tables measured, the
    # selection's epochs unchanged (docs/benchmarks.md)
    ema_steps: int = setting(
        20, "the candidate early stopping keeps each epoch is the running average of the weights over about "
        "this many steps (an exponential one: each step moves it 1/ema_steps of the way to the live "
        "weights), not the last step's; 0: the live weights")
    # average: cells +2.0, leaf +3.9, randhie +0.46 nats/row over live, for 1.1 to 2 times the epochs
    patience_on: PatienceOn = setting(
        "live", "train.ema_steps: whose validation log-likelihood early-stopping patience counts on; live: the last "
        "step's weights (the stage ends when training has stopped improving, as without an average); "
        "average: the averaged ones, which keep rising longer (better figures, more epochs)")
    # on a GPU an epoch takes milliseconds, and writing the run's state every epoch cost most of its time
    checkpoint_every_s: float = setting(
        10.0, "a checkpoint for --resume after the first epoch, then once this many seconds have passed "
        "since the last (and at the refit's start and the run's end); 0 writes one every epoch")

    @property
    def effective_lr(self) -> float:
        """train.lr after the large-batch rule (train.lr_scaling)."""
        power = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[self.lr_scaling]
        return self.lr * (self.batch_size / self.lr_base_batch) ** power

    def __post_init__(self) -> None:
        _check_positive("train", "val_max_rows", self.val_max_rows, allow_zero=True)
        _check_positive("train", "calibration_max_rows", self.calibration_max_rows, allow_zero=True)
        for key in ("epochs", "batch_size", "mc_samples", "val_iw_samples", "lr_base_batch", "refit_epochs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} is {getattr(self, key)!r}; it must be >= 1")
        _check_positive("train", "lr", self.lr)
        _check_positive("train", "beta", self.beta, allow_zero=True)
        _check_positive("train", "kl_warmup_steps", self.kl_warmup_steps, allow_zero=True)
        _check_positive("train", "early_stopping_patience", self.early_stopping_patience)
        _check_positive("train", "num_threads", self.num_threads, allow_zero=True)
        _check_positive("train", "grad_clip", self.grad_clip)
        _check_positive("train", "checkpoint_every_s", self.checkpoint_every_s, allow_zero=True)
        _check_positive("train", "max_rollbacks", self.max_rollbacks, allow_zero=True)
        _check_positive("train", "ema_steps", self.ema_steps, allow_zero=True)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"train.val_fraction is {self.val_fraction!r}; it must be in [0, 1)")
        if not 0 <= self.calibration_fraction < 1:
            raise ConfigError(f"train.calibration_fraction is {self.calibration_fraction!r}; it must be in [0, 1)")
        _check_positive("train", "lr_decays", self.lr_decays, allow_zero=True)
        _check_positive("train", "lr_warmup_steps", self.lr_warmup_steps, allow_zero=True)
        _check_positive("train", "lr_warmup_epochs", self.lr_warmup_epochs, allow_zero=True)
        if not 0 < self.lr_decay < 1:
            raise ConfigError(f"train.lr_decay is {self.lr_decay!r}; it must be in (0, 1)")
        if not 0 < self.lr_backoff < 1:
            raise ConfigError(f"train.lr_backoff is {self.lr_backoff!r}; it must be in (0, 1)")
        check_choice("train", "device", self.device, DeviceName)
        check_choice("train", "init", self.init, Init)
        check_choice("train", "refit_start", self.refit_start, RefitStart)
        check_choice("train", "refit", self.refit, Refit)
        check_choice("train", "patience_on", self.patience_on, PatienceOn)
        check_choice("train", "precision", self.precision, Precision)
        check_choice("train", "lr_scaling", self.lr_scaling, LrScaling)
        check_choice("train", "cuda_graph", self.cuda_graph, CudaGraph)
        check_choice("train", "compile", self.compile, Compile)


_KIND = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _typed(key: str, value: Any, kind: Any) -> Any:
    """value as the annotation kind wants it, or ConfigError naming key and what it expected."""
    origin, args = get_origin(kind), get_args(kind)
    if origin is Literal:
        if value is False and "off" in args:  # YAML 1.1 reads a bare `off` as false
            return "off"
        if isinstance(value, str) and value in args or isinstance(value, bool) and any(value is a for a in args):
            return value
        raise ConfigError(f"{key} is {value!r}; choose one of {_options(args)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _typed(key, value, next(a for a in args if a is not type(None)))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, list | tuple):
            example = "[64, 64] or []" if args[0] is int else "[sample_id]"
            raise ConfigError(f"{key} is {value!r}; expected a list, e.g. {key}={example}")
        return tuple(_typed(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if kind is bool and isinstance(value, bool) or kind is str and isinstance(value, str):
        return value
    if kind is int and isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{key} is {value!r}; expected a finite number")
        return float(value)
    if kind in _KIND:
        raise ConfigError(f"{key} is {value!r}; expected {_KIND[kind]}")
    return value  # an annotation this checker does not know: the constructor checks it


def config_from_dict(cls: Any, section: str, values: dict[str, Any]) -> Any:
    """Build a config dataclass from a mapping, rejecting unknown keys and wrong value types by name."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {section}.{unknown[0]}; known keys: {', '.join(sorted(known))}"
        )
    hints = typing.get_type_hints(cls)
    typed = {k: _typed(f"{section}.{k}", v, hints[k]) for k, v in values.items()}
    try:
        return cls(**typed)
    except TypeError as exc:  # an annotation _typed leaves to the constructor
        raise ConfigError(f"{section}: {exc}") from exc
