"""The only reader of params.yaml: typed, frozen sections, unknown keys rejected by name."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import PipelineError
from vae import ConfigError, ModelConfig, TrainConfig, config_from_dict
from vae.config import DeviceName, MissingPolicy

DEFAULT_PARAMS = Path("params.yaml")
OUTPUT_COLUMN = re.compile(r"z_\d+|z_logvar_\d+|log_likelihood|anomaly_pvalue|anomaly")  # embed's own output columns


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key} is {value!r}; it must be >= {low}")


@dataclass(frozen=True)
class DataParams:
    source: str = "sklearn:breast_cancer"  # a CSV/Parquet path, sklearn:NAME or synthetic:ROWSxCOLS
    id_columns: tuple[str, ...] = ()  # passed through untouched to every output
    # columns left out of the model without editing the table (train, validate); the model records
    # them, so later tables may still carry them
    drop_columns: tuple[str, ...] = ()
    missing: MissingPolicy = "reject"
    standardize: bool = True  # reported figures stay in original units (Jacobian added)
    test_fraction: float = 0.2  # prepare: rows held out for evaluation and the promotion gate
    seed: int = 0  # prepare: the split's permutation
    prepared_dir: str = "data/prepared"

    def __post_init__(self) -> None:
        object.__setattr__(self, "id_columns", tuple(self.id_columns))
        object.__setattr__(self, "drop_columns", tuple(self.drop_columns))
        both = [c for c in self.drop_columns if c in self.id_columns]
        if both:
            raise ConfigError(f"data.drop_columns names {both[0]!r}, which data.id_columns lists too; keep it in one")
        taken = [c for c in self.id_columns if OUTPUT_COLUMN.fullmatch(c)]
        if taken:
            raise ConfigError(
                f"data.id_columns names {taken[0]!r}, a column that embed writes itself "
                "(z_*, z_logvar_*, log_likelihood, anomaly_pvalue, anomaly); rename that column in the table"
            )
        if len(set(self.id_columns)) < len(self.id_columns):
            raise ConfigError(f"data.id_columns {list(self.id_columns)} names a column twice")
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
    # --against: share of a column's values that may lie beyond that widened range (a large table
    # from the training distribution has a few; rows far out are what the anomaly score is for)
    max_out_of_range_fraction: float = 0.01
    # --against: drift of each column from the model's training distribution (pipeline.contract.drift)
    drift: Literal["fail", "warn", "off"] = "fail"
    drift_max_shift_std: float = 0.25  # |new mean - training mean| in training stds
    drift_max_ks: float = 0.15  # Kolmogorov-Smirnov distance to the training distribution
    drift_alpha: float = 1e-3  # a limit fires only where the test is significant (Bonferroni)

    def __post_init__(self) -> None:
        for key in ("iid", "drift"):
            if getattr(self, key) is False:  # YAML 1.1 reads a bare `off` (params.yaml, --set) as false
                object.__setattr__(self, key, "off")
            if getattr(self, key) not in ("fail", "warn", "off"):
                raise ConfigError(f"validate.{key} is {getattr(self, key)!r}; choose one of fail, warn, off")
        if not 0 <= self.max_out_of_range_fraction <= 1:
            raise ConfigError("validate.max_out_of_range_fraction must be in [0, 1]")
        if not 0 < self.drift_alpha <= 1:
            raise ConfigError(f"validate.drift_alpha is {self.drift_alpha!r}; it must be in (0, 1]")
        if not 0 <= self.max_duplicate_fraction <= 1:
            raise ConfigError(f"validate.max_duplicate_fraction is {self.max_duplicate_fraction!r}; it must be in [0, 1]")
        if not 0 < self.iid_alpha <= 1:
            raise ConfigError(f"validate.iid_alpha is {self.iid_alpha!r}; it must be in (0, 1]")


@dataclass(frozen=True)
class EvaluateParams:
    iw_samples: int = 1000  # K of IWAE_K; the gap to log p(y) shrinks like 1/K
    seed: int = 0
    batch_rows: int = 256

    def __post_init__(self) -> None:
        _at_least("evaluate.iw_samples", self.iw_samples, 1)
        _at_least("evaluate.batch_rows", self.batch_rows, 1)


@dataclass(frozen=True)
class EmbedParams:
    batch_rows: int = 65536  # rows read, encoded and written at a time: bounds memory
    score_samples: int = 100  # importance samples per row for log_likelihood; 0 = no score columns
    anomaly_quantile: float = 0.01  # rows below this quantile of held-out rows' log-likelihoods
    with_variance: bool = False
    seed: int = 0
    # where the embedding flow maps the files of a folder: "" in this process, "local:N" a local
    # Dask cluster of N worker processes (started and stopped by the flow), else a scheduler address
    dask_address: str = ""
    device: DeviceName = "auto"  # auto: CUDA when present (pinned, overlapped copies), else CPU
    # torch threads on the CPU; 0 = torch's default (one per core). One is as fast as two on a
    # 2-vCPU box, and two embeddings at once then share the cores instead of oversubscribing them
    # (3.5x slower each with two threads apiece)
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"embed.device is {self.device!r}; choose one of auto, cpu, cuda")
        _at_least("embed.batch_rows", self.batch_rows, 1)
        _at_least("embed.num_threads", self.num_threads, 0)
        _at_least("embed.score_samples", self.score_samples, 0)
        object.__setattr__(self, "dask_address", str(self.dask_address or "").strip())
        if self.dask_address.startswith("local:") and not (
            self.dask_address[6:].isdigit() and int(self.dask_address[6:]) >= 1
        ):
            raise ConfigError(f"embed.dask_address is {self.dask_address!r}; use local:N with N >= 1 workers, "
                              "a scheduler address such as tcp://host:8786, or leave it empty")
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


def drop_columns(df: Any, data: DataParams, where: str) -> Any:
    """df without data.drop_columns; a name that is not a column of df is an error naming the key."""
    if not data.drop_columns:
        return df
    absent = [c for c in data.drop_columns if c not in df.columns]
    if absent:
        raise PipelineError(f"{where}: data.drop_columns names {absent[0]!r}, which is not a column of the table")
    return df.drop(columns=list(data.drop_columns))


def _plain(section: Any) -> dict[str, Any]:
    return {f.name: list(v) if isinstance(v := getattr(section, f.name), tuple) else v for f in fields(section)}


SECTIONS: dict[str, Any] = {f.name: f.default_factory for f in fields(Params)}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, but numbers in exponent form without a dot (1e-5, 3E4) are
    floats, as in YAML 1.2 and Python: `--set model.min_sigma=1e-5` means a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def parse_override(text: str) -> tuple[str, str, Any]:
    """'section.key=value' (value as YAML) -> (section, key, value)."""
    lhs, sep, rhs = text.partition("=")
    section, dot, key = lhs.strip().partition(".")
    if not sep or not dot or not key:
        raise PipelineError(f"--set {text!r}: expected section.key=value, e.g. train.epochs=50")
    try:
        value = _yaml(rhs) if rhs.strip() else None
    except yaml.YAMLError as exc:
        raise PipelineError(f"--set {text!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
    return section, key, value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: the problem and where, e.g. "expected <block end> at line 3, column 2"."""
    problem = getattr(exc, "problem", None) or exc.__class__.__name__
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = _yaml(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"cannot read params file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"params file {path} is not valid YAML: {_yaml_problem(exc)}") from None
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
    origin: dict[str, str] = {}  # "section.key" -> where its value came from
    for section, values in raw.items():
        if section not in SECTIONS:
            raise PipelineError(f"{where}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise PipelineError(f"{where}: section {section!r} must be a mapping of key: value")
        merged[section] = dict(values)
        origin |= {f"{section}.{k}": where for k in values}
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise PipelineError(f"--set {text!r}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
        merged.setdefault(section, {})[key] = value
        origin[f"{section}.{key}"] = "--set"
    built = {}
    for s, values in merged.items():
        try:
            built[s] = config_from_dict(type(SECTIONS[s]()), s, values)
        except ConfigError as exc:
            named = [o for k, o in origin.items() if re.search(rf"\b{re.escape(k)}\b", str(exc))]
            source = named[0] if named and named[0] != "--set" else None  # a --set names its key already
            raise PipelineError(f"{source}: {exc}" if source else str(exc)) from None
    return Params(**built)
