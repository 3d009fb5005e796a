"""Typed, frozen options of the model and of training. Defaults carry their reason."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from vae.errors import ConfigError

Likelihood = Literal["gaussian", "bernoulli", "auto"]
DecoderVariance = Literal["fixed", "shared", "per_feature", "heteroscedastic"]
Activation = Literal["relu", "silu", "tanh", "elu"]
MissingPolicy = Literal["reject", "mask"]
DeviceName = Literal["auto", "cpu", "cuda"]


def _check_choice(section: str, key: str, value: object, options: Any) -> None:
    allowed = get_args(options)
    if value not in allowed:
        raise ConfigError(f"{section}.{key} is {value!r}; choose one of {', '.join(allowed)}")


def _check_positive(section: str, key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{key} is {value!r}; it must be {bound}")


@dataclass(frozen=True)
class ModelConfig:
    latent_dim: int = 8  # small enough to read, large enough for most sensor tables
    hidden_dims: tuple[int, ...] = (128, 128)  # () makes encoder and decoder affine (pPCA case)
    likelihood: Likelihood = "auto"  # binary {0,1} columns get a Bernoulli, the rest a Gaussian
    decoder_variance: DecoderVariance = "per_feature"  # a fixed variance costs nats (notes/speed.md)
    fixed_sigma: float = 1.0  # only for decoder_variance: fixed, in standardized units
    min_sigma: float = 1e-3  # floor: a continuous density on a repeated value can grow unboundedly
    activation: Activation = "relu"  # fastest on CPU; smooth activations are an option

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_dims", tuple(int(h) for h in self.hidden_dims))
        if self.latent_dim < 1:
            raise ConfigError(f"model.latent_dim is {self.latent_dim!r}; it must be >= 1")
        if any(h < 1 for h in self.hidden_dims):
            raise ConfigError(f"model.hidden_dims is {list(self.hidden_dims)}; widths must be >= 1")
        _check_choice("model", "likelihood", self.likelihood, Likelihood)
        _check_choice("model", "decoder_variance", self.decoder_variance, DecoderVariance)
        _check_choice("model", "activation", self.activation, Activation)
        _check_positive("model", "fixed_sigma", self.fixed_sigma)
        _check_positive("model", "min_sigma", self.min_sigma)
        if self.decoder_variance == "fixed" and self.fixed_sigma < self.min_sigma:
            raise ConfigError(
                f"model.fixed_sigma is {self.fixed_sigma!r}, below model.min_sigma {self.min_sigma!r}"
            )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    batch_size: int = 256  # fast on CPU; large enough for a stable Adam step
    lr: float = 1e-3
    mc_samples: int = 1  # M reparameterized samples per row (Kingma & Welling 2014 use 1)
    beta: float = 1.0  # 1 is the ELBO; other values trade reconstruction against KL
    kl_warmup_steps: int = 0  # optimizer steps over which beta ramps linearly from 0
    val_fraction: float = 0.1  # rows held out for early stopping
    early_stopping_patience: int = 20  # epochs without a better validation ELBO
    seed: int = 0
    device: DeviceName = "auto"
    num_threads: int = 1  # one thread is often faster than two on a 2-vCPU box; 0 = torch default
    grad_clip: float = 100.0  # clips the global gradient norm; guards against rare huge steps
    max_rollbacks: int = 3  # consecutive non-finite rollbacks before training gives up
    lr_backoff: float = 0.5  # learning-rate factor after each rollback

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "mc_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} is {getattr(self, key)!r}; it must be >= 1")
        _check_positive("train", "lr", self.lr)
        _check_positive("train", "beta", self.beta, allow_zero=True)
        _check_positive("train", "kl_warmup_steps", self.kl_warmup_steps, allow_zero=True)
        _check_positive("train", "early_stopping_patience", self.early_stopping_patience)
        _check_positive("train", "num_threads", self.num_threads, allow_zero=True)
        _check_positive("train", "grad_clip", self.grad_clip)
        _check_positive("train", "max_rollbacks", self.max_rollbacks, allow_zero=True)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"train.val_fraction is {self.val_fraction!r}; it must be in [0, 1)")
        if not 0 < self.lr_backoff < 1:
            raise ConfigError(f"train.lr_backoff is {self.lr_backoff!r}; it must be in (0, 1)")
        _check_choice("train", "device", self.device, DeviceName)


def config_from_dict(cls: Any, section: str, values: dict[str, Any]) -> Any:
    """Build a config dataclass from a mapping, rejecting unknown keys by name."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {section}.{unknown[0]}; known keys: {', '.join(sorted(known))}"
        )
    try:
        return cls(**values)
    except TypeError as exc:  # wrong value types reach comparisons in __post_init__
        raise ConfigError(f"{section}: {exc}") from exc
