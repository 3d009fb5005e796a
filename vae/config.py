"""Typed, frozen options of the model and of training. Defaults carry their reason."""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args, get_origin

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
CudaGraph = Literal["auto", True, False]


def _options(allowed: tuple[Any, ...]) -> str:
    """The choices as params.yaml spells them (true/false, not True/False)."""
    return ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)


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
    latent_dim: int = 8  # small enough to read; measured on breast_cancer, bfi, leaf (benchmarks/quality.py)
    hidden_dims: tuple[int, ...] = (128, 128)  # () makes encoder and decoder affine (pPCA case)
    likelihood: Likelihood = "auto"  # binary {0,1} columns get a Bernoulli, the rest a Gaussian
    # full: the noise carries the correlations the latent misses; with the linear start the model
    # begins at the full-covariance Gaussian, the baseline every model must meet
    decoder_variance: DecoderVariance = "full"
    fixed_sigma: float = 1.0  # only for decoder_variance: fixed, in standardized units
    min_sigma: float = 1e-3  # floor: a continuous density on a repeated value can grow unboundedly
    activation: Activation = "relu"  # fastest on CPU; smooth activations are an option
    noise_rank: int = 4  # decoder_variance lowrank: rank of the noise covariance beyond its diagonal
    # a linear path beside each MLP (mu = MLP(x) + A x + b): training starts it at the closed-form
    # linear-Gaussian fit, so the network only has to learn what that fit misses
    linear_path: bool = True
    # full / lowrank (the diagonal kinds ignore it): per-column noise scales that depend on z,
    # Sigma(z) = D(z) Sigma D(z) with D(z) = diag(exp(h(z))) from a decoder head; training opens
    # the head once the means have converged (see vae.train), so the noise cannot take over what
    # the latent should explain
    noise_by_z: bool = True  # measured: +0.4 to +1.9 nats/row on concrete, quakes, college (tuning tables)
    # real columns modelled as log y (strictly positive ones; the density keeps the Jacobian -log y,
    # so nats/row stay in the table's units): none, auto (each positive column where that raises the
    # validation log-likelihood of the full Gaussian: vae.table.choose_log_columns), or a list of names
    log_columns: Any = "auto"

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
        if self.decoder_variance == "fixed" and self.fixed_sigma < self.min_sigma:
            raise ConfigError(
                f"model.fixed_sigma is {self.fixed_sigma!r}, below model.min_sigma {self.min_sigma!r}"
            )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 800  # with model.noise_by_z the first stage takes at most half
    batch_size: int = 128  # fast on CPU; small enough for tables of a few hundred rows
    lr: float = 1e-3  # Adam's, after the warm-up and until the first plateau; then it falls (lr_decays)
    mc_samples: int = 1  # M reparameterized samples per row (Kingma & Welling 2014 use 1)
    beta: float = 1.0  # 1 is the ELBO; other values trade reconstruction against KL
    kl_warmup_steps: int = 0  # optimizer steps over which beta ramps linearly from 0
    val_fraction: float = 0.1  # rows held out for early stopping (and, without calibration rows, the anomaly threshold)
    # rows of the training table held out from the selection's training and early stopping, on
    # which the pipeline places the anomaly threshold; only a refit trains on them (0: none, the
    # threshold goes on the validation rows). breast_cancer, quantile 0.01: 1.5 % of test rows
    # flagged on 0.2's 82 rows, 3.7 % on the 46 validation rows. Without a refit no model trains on
    # them (six tuning tables: the selection on 90 % of the rows scored up to 4.9 nats/row more)
    calibration_fraction: float = 0.2
    early_stopping_patience: int = 10  # epochs without a better validation ELBO
    # when early stopping would end the selection, the lr falls by lr_decay and training goes on,
    # lr_decays times (0: a constant lr); the refit replays the drops. 1e-3 (after a warm-up),
    # patience 10, two falls by 0.3, against the constant 3e-4 with patience 40: 2 to 4 times fewer
    # epochs on the tuning tables, held-out figures within their spread (docs/benchmarks.md)
    lr_decays: int = 2
    lr_decay: float = 0.3
    # the lr ramps linearly from lr / lr_warmup_steps to lr over each stage's first steps (0: none):
    # Adam's first full-size steps threw the closed-form start away on wide tables (cells)
    lr_warmup_steps: int = 500
    seed: int = 0
    device: DeviceName = "auto"
    num_threads: int = 1  # one thread is often faster than two on a 2-vCPU box; 0 = torch default
    grad_clip: float = 100.0  # clips the global gradient norm; guards against rare huge steps
    max_rollbacks: int = 3  # consecutive non-finite rollbacks before training gives up
    lr_backoff: float = 0.5  # learning-rate factor after each rollback
    # linear_gaussian: start from the closed-form linear-Gaussian fit of the training rows (exact
    # posterior, p(y) the baseline's), so no model scores below it on validation; random: as torch
    init: Init = "linear_gaussian"
    # after early stopping chose the weights on the validation split, train on all rows (training,
    # validation and calibration): the held-out rows are not lost to the final model (only with init
    # linear_gaussian and val_fraction); with calibration rows it is what gives them back to it
    refit: bool = True
    # where the refit starts. init: from the closed-form start of all rows for the selection's epoch
    # count, replaying its lr falls (about doubles the time). selected: from the weights early
    # stopping chose, refit_epochs epochs on all rows at the selection's last lr (no warm-up): 30-45 %
    # fewer epochs, but 0.1 to 1.8 nats/row lower on each of the six tuning tables (10 epochs; 30: 0.1
    # to 1.1), docs/benchmarks.md
    refit_start: RefitStart = "init"
    refit_epochs: int = 10  # refit_start selected: the epochs on all rows
    # auto: bf16 autocast on CUDA, fp32 on CPU; bf16 runs the networks in bfloat16 (CPU too), the
    # loss terms and log-densities stay fp32; `vae.precision_gap` measures what bf16 changes
    precision: Precision = "auto"
    # CUDA only: replay each full-size training step from a CUDA graph (forward, backward, clipping,
    # fused Adam): one launch instead of hundreds. auto: on CUDA wherever a graph is correct (one
    # process; see vae.step.resolve_cuda_graph), off on the CPU; true / false force it (CPU: off)
    cuda_graph: CudaGraph = "auto"
    # large batches: lr * (batch_size / lr_base_batch) ** (1/2 | 1); sqrt is the rule for Adam
    # (Malladi et al. 2022), none keeps train.lr whatever the batch
    lr_scaling: LrScaling = "none"
    lr_base_batch: int = 128
    # a checkpoint for --resume after the first epoch, then once this many seconds have passed since
    # the last (and at the end of each stage): on a GPU an epoch takes milliseconds and writing the
    # run's state every epoch cost most of its time; 0 writes one every epoch
    checkpoint_every_s: float = 10.0

    @property
    def effective_lr(self) -> float:
        """train.lr after the large-batch rule (train.lr_scaling)."""
        power = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[self.lr_scaling]
        return self.lr * (self.batch_size / self.lr_base_batch) ** power

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "mc_samples", "lr_base_batch", "refit_epochs"):
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
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"train.val_fraction is {self.val_fraction!r}; it must be in [0, 1)")
        if not 0 <= self.calibration_fraction < 1:
            raise ConfigError(f"train.calibration_fraction is {self.calibration_fraction!r}; it must be in [0, 1)")
        _check_positive("train", "lr_decays", self.lr_decays, allow_zero=True)
        _check_positive("train", "lr_warmup_steps", self.lr_warmup_steps, allow_zero=True)
        if not 0 < self.lr_decay < 1:
            raise ConfigError(f"train.lr_decay is {self.lr_decay!r}; it must be in (0, 1)")
        if not 0 < self.lr_backoff < 1:
            raise ConfigError(f"train.lr_backoff is {self.lr_backoff!r}; it must be in (0, 1)")
        check_choice("train", "device", self.device, DeviceName)
        check_choice("train", "init", self.init, Init)
        check_choice("train", "refit_start", self.refit_start, RefitStart)
        check_choice("train", "precision", self.precision, Precision)
        check_choice("train", "lr_scaling", self.lr_scaling, LrScaling)
        check_choice("train", "cuda_graph", self.cuda_graph, CudaGraph)


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
