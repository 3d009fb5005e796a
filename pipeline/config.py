"""The only reader of params.yaml: typed, frozen sections, unknown keys rejected by name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import PipelineError
from vae import ConfigError, ModelConfig, TrainConfig, config_from_dict
from vae.config import MissingPolicy

DEFAULT_PARAMS = Path("params.yaml")


@dataclass(frozen=True)
class DataParams:
    source: str = "sklearn:breast_cancer"  # a CSV/Parquet path, sklearn:NAME or synthetic:ROWSxCOLS
    id_columns: tuple[str, ...] = ()  # passed through untouched to every output
    missing: MissingPolicy = "reject"
    standardize: bool = True  # reported figures stay in original units (Jacobian added)
    test_fraction: float = 0.2  # prepare: rows held out for evaluation and the promotion gate
    seed: int = 0  # prepare: the split's permutation
    prepared_dir: str = "data/prepared"

    def __post_init__(self) -> None:
        object.__setattr__(self, "id_columns", tuple(self.id_columns))
        if self.missing not in ("reject", "mask"):
            raise ConfigError(f"data.missing is {self.missing!r}; choose one of reject, mask")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"data.test_fraction is {self.test_fraction!r}; it must be in (0, 1)")


@dataclass(frozen=True)
class ValidateParams:
    iid: Literal["fail", "warn", "off"] = "fail"
    max_duplicate_fraction: float = 0.05  # share of rows that repeat an earlier row
    min_rows: int = 10
    # i.i.d. limits (effect sizes) meant for plain violations: a sorted or drifting column, runs of
    # alike rows, a step between the halves. sklearn:breast_cancer's shipped order has a real but
    # milder trend (|rho| ~0.2, halves 0.4 std apart) that these let through
    max_autocorrelation: float = 0.5  # lag-1 autocorrelation along row order, per column
    max_trend_correlation: float = 0.5  # |Spearman rho| of a column against the row number
    max_shift_std: float = 0.8  # first vs second half, difference of means in pooled stds
    # a limit fires only where the statistic is also significant at iid_alpha (Bonferroni over the
    # columns), so small i.i.d. tables, whose statistics are noisy (sd ~ 1/sqrt(n)), stay clean
    iid_alpha: float = 1e-4
    range_tolerance: float = 0.5  # --against: allowed overshoot of the training range, in ranges

    def __post_init__(self) -> None:
        if self.iid not in ("fail", "warn", "off"):
            raise ConfigError(f"validate.iid is {self.iid!r}; choose one of fail, warn, off")
        if not 0 <= self.max_duplicate_fraction <= 1:
            raise ConfigError("validate.max_duplicate_fraction must be in [0, 1]")
        if not 0 < self.iid_alpha <= 1:
            raise ConfigError(f"validate.iid_alpha is {self.iid_alpha!r}; it must be in (0, 1]")


@dataclass(frozen=True)
class EvaluateParams:
    iw_samples: int = 1000  # K of IWAE_K; the gap to log p(y) shrinks like 1/K
    seed: int = 0
    batch_rows: int = 256

    def __post_init__(self) -> None:
        if self.iw_samples < 1 or self.batch_rows < 1:
            raise ConfigError("evaluate.iw_samples and evaluate.batch_rows must be >= 1")


@dataclass(frozen=True)
class EmbedParams:
    batch_rows: int = 65536  # rows read, encoded and written at a time: bounds memory
    score_samples: int = 100  # importance samples per row for log_likelihood; 0 = no score columns
    anomaly_quantile: float = 0.01  # rows below this quantile of training log-likelihoods
    with_variance: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_rows < 1 or self.score_samples < 0:
            raise ConfigError("embed.batch_rows must be >= 1 and embed.score_samples >= 0")
        if not 0 < self.anomaly_quantile < 1:
            raise ConfigError(f"embed.anomaly_quantile is {self.anomaly_quantile!r}; it must be in (0, 1)")


@dataclass(frozen=True)
class RegisterParams:
    model_name: str = "measurement-vae"
    min_improvement: float = 0.0  # nats/row the challenger must gain over the champion
    experiment: str = "vaepipe"


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    embed: EmbedParams = field(default_factory=EmbedParams)
    register: RegisterParams = field(default_factory=RegisterParams)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(section: Any) -> dict[str, Any]:
    return {f.name: list(v) if isinstance(v := getattr(section, f.name), tuple) else v for f in fields(section)}


SECTIONS: dict[str, Any] = {f.name: f.default_factory for f in fields(Params)}


def parse_override(text: str) -> tuple[str, str, Any]:
    """'section.key=value' (value as YAML) -> (section, key, value)."""
    lhs, sep, rhs = text.partition("=")
    section, dot, key = lhs.strip().partition(".")
    if not sep or not dot or not key:
        raise PipelineError(f"--set {text!r}: expected section.key=value, e.g. train.epochs=50")
    try:
        value = yaml.safe_load(rhs) if rhs.strip() else None
    except yaml.YAMLError as exc:
        raise PipelineError(f"--set {text!r}: the value is not valid YAML ({exc.__class__.__name__})") from None
    return section, key, value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise PipelineError(f"cannot read params file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"params file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"params file {path} must be a mapping of sections")
    return raw


def load_params(path: Path | None = None, overrides: Sequence[str] = ()) -> Params:
    """Defaults, then the params file (path, else ./params.yaml if present), then --set overrides."""
    if path is not None and not Path(path).exists():
        raise PipelineError(f"params file {path} does not exist")
    path = path if path is not None else (DEFAULT_PARAMS if DEFAULT_PARAMS.exists() else None)
    raw = _read_yaml(Path(path)) if path is not None else {}
    where = str(path) if path is not None else "params"
    merged: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise PipelineError(f"{where}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise PipelineError(f"{where}: section {section!r} must be a mapping")
        merged[section] = dict(values)
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise PipelineError(f"--set {text!r}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
        merged.setdefault(section, {})[key] = value
    try:
        built = {s: config_from_dict(type(SECTIONS[s]()), s, v) for s, v in merged.items()}
    except ConfigError as exc:
        raise PipelineError(str(exc)) from None
    return Params(**built)
