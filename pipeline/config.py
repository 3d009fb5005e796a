"""The only reader of params.yaml: typed, frozen sections, unknown keys rejected by name.

Each key is declared once, in its section's dataclass (here, and ModelConfig / TrainConfig in
vae/config.py): its type (a Literal names its choices), its built-in default and its help
(`setting`). params.yaml and docs/params.md are written from them (pipeline.params_doc)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import PipelineError
from vae import ConfigError, ModelConfig, TrainConfig, config_from_dict
from vae.config import DeviceName, MissingPolicy, check_choice, setting

DEFAULT_PARAMS = Path("params.yaml")
OnFailure = Literal["fail", "warn", "off"]  # what a failed check does: fail, warn, or no check
OUTPUT_COLUMN = re.compile(r"z_\d+|z_logvar_\d+|log_likelihood|anomaly_pvalue|anomaly")  # embed's own output columns


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key} is {value!r}; it must be >= {low}")


@dataclass(frozen=True)
class DataParams:
    source: str = setting("sklearn:breast_cancer", "a CSV/Parquet path, sklearn:NAME, or synthetic:ROWSxCOLS")
    id_columns: tuple[str, ...] = setting(
        (), "columns passed through untouched to every output (never modelled)")
    drop_columns: tuple[str, ...] = setting(
        (), "columns the model leaves out, without editing the table (train, validate); the model "
        "records them, so later tables may still carry them")
    missing: MissingPolicy = setting(
        "reject", "what empty cells do; reject: refused by column and row; mask: the likelihood sums over the "
        "observed cells, the encoder sees the mask, and embed adds anomaly_pvalue")
    standardize: bool = setting(
        True, "learn the noise on standardized columns (p(y) is always in the table's units: the "
        "Jacobian is added)")
    test_fraction: float = setting(0.2, "rows prepare holds out for evaluation and the promotion gate")
    seed: int = setting(0, "the split's seed (prepare's permutation of the rows)")
    prepared_dir: str = setting("data/prepared", "where prepare writes train/val/test.parquet")

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
        check_choice("data", "missing", self.missing, MissingPolicy)
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"data.test_fraction is {self.test_fraction!r}; it must be in (0, 1)")


@dataclass(frozen=True)
class ValidateParams:
    iid: OnFailure = setting(
        "fail", "the i.i.d. checks along the row order, meant for plain violations: a sorted or drifting "
        "column, runs of alike rows, a step between the halves")
    max_duplicate_fraction: float = setting(0.05, "share of rows that may repeat an earlier row")
    min_rows: int = setting(10, "fewer rows are refused")
    # sklearn:breast_cancer's shipped order has a real but milder trend (|rho| ~0.2, halves 0.4 std
    # apart) that the i.i.d. limits let through
    max_autocorrelation: float = setting(
        0.5, "i.i.d. limit (an effect size, like the next two): lag-1 autocorrelation along the row "
        "order, per column")
    max_trend_correlation: float = setting(0.5, "i.i.d. limit: |Spearman rho| of a column against the row number")
    max_shift_std: float = setting(0.8, "i.i.d. limit: second half's mean minus the first's, in pooled stds")
    iid_alpha: float = setting(
        1e-4, "significance of the i.i.d. tests, before the Bonferroni correction over the columns: a "
        "limit fires only where its statistic is also significant, so small i.i.d. tables, whose "
        "statistics are noisy (sd ~ 1/sqrt(n)), stay clean")
    range_tolerance: float = setting(
        0.5, "--against MODEL (and embed): allowed overshoot of the training range, in ranges")
    max_out_of_range_fraction: float = setting(
        0.01, "--against MODEL (and embed): share of a column's values beyond that widened range (a large "
        "table from the training distribution has a few; rows far out are what the anomaly score is for)")
    # pipeline.contract.drift
    drift: OnFailure = setting(
        "fail", "the drift of each column from the model's training distribution (--against MODEL, and embed)")
    drift_max_shift_std: float = setting(0.25, "drift limit: |new mean - training mean| in training stds")
    drift_max_ks: float = setting(
        0.15, "drift limit: Kolmogorov-Smirnov distance to the training distribution (text columns: total "
        "variation)")
    drift_alpha: float = setting(
        1e-3, "a drift limit fires only where its test is significant at this level (Bonferroni)")

    def __post_init__(self) -> None:
        for key in ("iid", "drift"):
            if getattr(self, key) is False:  # YAML 1.1 reads a bare `off` (params.yaml, --set) as false
                object.__setattr__(self, key, "off")
            check_choice("validate", key, getattr(self, key), OnFailure)
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
    iw_samples: int = setting(
        1000, "K of the IWAE log-likelihood estimate (its gap to log p(y) shrinks like 1/K)")
    seed: int = setting(0, "the draws of z")
    batch_rows: int = setting(256, "rows scored at a time (x iw_samples draws each)")

    def __post_init__(self) -> None:
        _at_least("evaluate.iw_samples", self.iw_samples, 1)
        _at_least("evaluate.batch_rows", self.batch_rows, 1)


@dataclass(frozen=True)
class EmbedParams:
    batch_rows: int = setting(65536, "rows read, encoded and written at a time: bounds memory")
    score_samples: int = setting(
        100, "K of the per-row IWAE score, log_likelihood (0: no score or anomaly columns)")
    anomaly_quantile: float = setting(0.01, "anomaly: below this quantile of held-out rows' scores")
    with_variance: bool = setting(False, "also write z_logvar_* (the CLI's --with-variance)")
    seed: int = setting(0, "the draws of the scores")
    dask_address: str = setting(
        "", "where the embedding flow maps the files of a folder: \"\" in this process, local:N a local "
        "Dask cluster of N worker processes (started and stopped by the flow), else a scheduler address "
        "such as tcp://scheduler:8786")
    device: DeviceName = setting(
        "auto", "where embed runs; auto: CUDA when present (pinned, overlapped copies), else the CPU")
    # two threads apiece made two embeddings at once 3.5x slower each
    num_threads: int = setting(
        1, "torch threads on the CPU (0: torch's default, one per core); one is as fast as two on a "
        "2-vCPU box, and two embeddings at once then share the cores instead of oversubscribing them")

    def __post_init__(self) -> None:
        check_choice("embed", "device", self.device, DeviceName)
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
    model_name: str = setting("measurement-vae", "the MLflow registered model")
    min_improvement: float = setting(
        0.0, "nats/row a challenger must beat @champion by on the gate's table")
    experiment: str = setting("vaepipe", "the MLflow experiment runs are logged in")


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

# The stages that read each section, its owner first. A section is named for what it configures;
# the key names are a contract (users' params files), so a setting another stage needs stays in its
# owner's section and is listed here: prepare writes the validation split (train.val_fraction), train
# places the anomaly threshold embed applies (embed.*), embed and the gate check drift (validate.*).
# `data` is the shared section. tests/pipeline/test_config.py holds this to the stages' code.
READ_BY: dict[str, tuple[str, ...]] = {
    "data": ("prepare", "validate", "train", "register"),
    "validate": ("validate", "embed", "register"),
    "model": ("train",),
    "train": ("train", "prepare"),
    "evaluate": ("evaluate", "register"),
    "embed": ("embed", "train", "sample"),
    "register": ("register", "validate"),
}


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
