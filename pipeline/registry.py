"""The register and promote steps: MLflow runs, registered versions, aliases and the gate.

A registered version is a pyfunc (pipeline.pyfunc) around the model directory, logged in one
run with the model's params, training curves, metrics, plots and lineage tags. Aliases:
`challenger` (registered, not yet gated) and `champion` (passed the promotion gate).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import ColSpec, DataType
from mlflow.types import Schema as MlflowSchema
from mlflow.types.schema import AnyType

from pipeline import plots, stores
from pipeline.config import Params
from pipeline.contract.model import LoadedModel, load_model_dir
from pipeline.embed import embed_frame
from pipeline.errors import GateRefused, PipelineError, ValidationFailed
from pipeline.evaluate import metrics_dict
from pipeline.io.hashing import file_sha256
from pipeline.io.tables import iter_table_batches, read_table
from pipeline.lineage import lineage_tags
from pipeline.locks import promotion_lock
from pipeline.pyfunc import MODEL_CODE, embed_params, pip_requirements
from pipeline.resolve import (
    ARTIFACT_KEY,
    download_model_dir,
    not_found,
    registered_aliases,
    resolve_version,
)
from pipeline.validate import validate_table
from vae.store import CHECKPOINT, HISTORY, MANIFEST, WEIGHTS

CHALLENGER, CHAMPION = "challenger", "champion"
HISTORY_METRICS = ("train_elbo", "train_recon", "train_kl", "val_elbo", "val_recon", "val_kl", "lr", "beta")
SCHEDULES = ("lr", "beta")  # logged per epoch only when they change
HELD_OUT = "test_"  # MLflow metric names of the metrics JSON: which rows they were computed on
HELD_OUT_COUNTS = ("n_rows", "iw_samples")  # logged as params test.n_rows, test.iw_samples
REGISTRATION_TAG = "vaepipe.registration_key"  # run tag: registration_key of the model it logged
EXAMPLE_ROWS = 5  # rows of the input example stored with the model (and used for its signature)


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    alias: str | None  # None: registered without an alias (a DVC experiment's model)
    model_uri: str  # models:/NAME/VERSION


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    challenger_version: str
    champion_version: str | None  # before the gate
    challenger_log_likelihood: float | None
    champion_log_likelihood: float | None
    required: float | None  # the champion's log-likelihood + register.min_improvement
    message: str


# ---------------------------------------------------------------- register


def register_model(
    model_dir: Path,
    params: Params,
    *,
    alias: str | None = CHALLENGER,
    metrics: dict[str, Any] | None = None,
    table: Path | None = None,
    tags: dict[str, str] | None = None,
) -> RegisteredVersion:
    """Log MODEL_DIR in one run, register it as a new version of register.model_name, set alias
    (None: no alias) and the version tags.

    metrics: the metrics JSON to log; None takes MODEL_DIR/metrics.json when `evaluate` wrote one.
    A model whose table contract differs from @champion's is refused before any registry write.
    """
    model = load_model_dir(Path(model_dir))  # a bad directory fails before any registry write
    metrics = metrics if metrics is not None else model.metrics()
    history = _read_history(model.directory)
    frame = _table_frame(model, Path(table)) if table is not None else None
    name = params.register.model_name
    experiment_id = stores.configure_mlflow(params.register.experiment)
    check_champion_contract(_contract_frame(model.schema), name, str(model.directory), params.data.source)
    key = registration_key(model.directory)
    client = MlflowClient()
    earlier = _version_of_earlier_run(client, experiment_id, name, key)
    if earlier is not None:  # a retry after a failure past the version's creation: finish that one
        version, run_id = str(earlier.version), str(earlier.run_id)
    else:
        with tempfile.TemporaryDirectory(prefix="vaepipe-register-") as tmp, \
                mlflow.start_run(run_name=run_name(model), tags={REGISTRATION_TAG: key}) as run:
            _log_run(run.info.run_id, model, history, metrics, frame, Path(tmp))
            info = _log_pyfunc(model, _stage(model.directory, Path(tmp)), name, _input_example(model, frame))
        version, run_id = str(info.registered_model_version), run.info.run_id
    for tag, value in {**_version_tags(model, metrics, run_id), **(tags or {})}.items():
        client.set_model_version_tag(name, version, tag, value)
    if alias is not None:
        client.set_registered_model_alias(name, alias, version)
    return RegisteredVersion(name, version, run_id, alias, f"models:/{name}/{version}")


def _contract_frame(schema: Any) -> pd.DataFrame:
    """An empty frame with a schema's id and feature columns and dtypes: what Schema.problems reads."""
    columns = {c: pd.Series(dtype="object") for c in schema.id_columns}
    for c, t in zip(schema.features, schema.dtypes, strict=True):
        try:
            columns[c] = pd.Series(dtype=t)
        except TypeError:
            columns[c] = pd.Series(dtype="object")
    return pd.DataFrame(columns)


def check_champion_contract(frame: pd.DataFrame, name: str, what: str, source: str = "") -> None:
    """Refuse (exit 2) a table or model whose columns are not those of NAME's @champion: it cannot
    be compared with that champion, nor registered under its name, unless the user names it apart."""
    version = current_champion(name)
    if version is None:
        return
    champion = _version_model(name, version).schema
    problems = champion.problems(frame)
    if problems:
        raise _contract_error(what, name, version, champion, problems, source, "or registered under its name")


def _contract_error(what: str, name: str, version: str, champion: Any, problems: list[str], source: str,
                    also: str) -> PipelineError:
    base = source.split(":", 1)[1] if source.startswith("sklearn:") else "" if ":" in source else Path(source).stem
    stem = re.sub(r"[^\w-]+", "-", base).strip("-")
    suggestion = f"{stem}-vae" if stem else f"{name}-2"
    return PipelineError(
        f"{what} has another table contract than @{CHAMPION} version {version} of {name} ({'; '.join(problems)}, "
        f"against that champion's {len(champion.features)} columns {', '.join(map(repr, champion.features[:4]))}"
        f"{', ...' if len(champion.features) > 4 else ''}): it cannot be compared with that champion {also}. "
        f"Give this table's models a name of their own: set register.model_name in params.yaml "
        f"(or --set register.model_name={suggestion})")


def registration_key(directory: Path) -> str:
    """sha256 of the model's manifest and weights: the same trained model, the same key."""
    digest = hashlib.sha256()
    for name in (MANIFEST, WEIGHTS):
        digest.update(name.encode() + b"\0" + file_sha256(Path(directory) / name).encode())
    return digest.hexdigest()


def _version_of_earlier_run(client: MlflowClient, experiment_id: str, name: str, key: str) -> ModelVersion | None:
    """The version a run tagged with key already registered under name (registration is idempotent)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{REGISTRATION_TAG}` = '{key}'")
    versions = [v for r in runs for v in client.search_model_versions(f"name = '{name}' and run_id = '{r.info.run_id}'")]
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _read_history(directory: Path) -> pd.DataFrame:
    path = directory / HISTORY
    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path} is missing or unreadable ({exc.__class__.__name__}); retrain the model") from None


def _table_frame(model: LoadedModel, path: Path) -> pd.DataFrame:
    df = read_table(path)
    model.schema.check(df, str(path))
    return df


def _log_run(run_id: str, model: LoadedModel, history: pd.DataFrame, metrics: dict[str, Any] | None,
             frame: pd.DataFrame | None, tmp: Path) -> None:
    config = model.metadata.get("params", {})
    mlflow.log_params({f"{s}.{k}": _param_text(v) for s, section in config.items() for k, v in section.items()})
    MlflowClient().log_batch(run_id, metrics=_history_metrics(history))
    mlflow.log_dict(config, "params.json")
    if metrics is not None:
        counts = {f"test.{k}": metrics[k] for k in HELD_OUT_COUNTS if _is_scalar(metrics.get(k))}
        mlflow.log_params({k: str(v) for k, v in counts.items()})  # constants of the evaluation, not metrics
        mlflow.log_metrics(held_out_metrics(metrics))
        mlflow.log_dict(metrics, "metrics.json")
    mlflow.set_tags(lineage_tags(model, config))
    plots.model_figures(model, history, tmp / "plots", metrics=metrics, table=frame)
    mlflow.log_artifacts(str(tmp / "plots"), "plots")


def held_out_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics JSON as MLflow metrics: `test_` + its key (the rows it was computed on), the
    baselines as test_baseline_NAME, and what the VAE adds over the full Gaussian."""
    out = {f"{HELD_OUT}{k}": float(v) for k, v in metrics.items() if _is_scalar(v) and k not in HELD_OUT_COUNTS}
    baselines = metrics.get("baselines")
    baselines = baselines if isinstance(baselines, dict) else {}
    out |= {f"{HELD_OUT}baseline_{k}": float(v) for k, v in baselines.items() if _is_scalar(v)}
    if _is_scalar(metrics.get("log_likelihood")) and _is_scalar(baselines.get("full_gauss")):
        out[f"{HELD_OUT}gain_over_full_gauss"] = float(metrics["log_likelihood"]) - float(baselines["full_gauss"])
    return out


def held_out(run_metrics: dict[str, float], key: str) -> float | None:
    """A held-out metric of a run: `test_KEY`, or KEY as runs logged before the prefix."""
    value = run_metrics.get(f"{HELD_OUT}{key}", run_metrics.get(key))
    return None if value is None else float(value)


def run_name(model: LoadedModel) -> str:
    """The table, its size and the date, e.g. 'breast_cancer 455x30 2026-12-07 01:15'."""
    data = model.metadata.get("data", {})
    path = Path(str(data.get("path", "")))
    source = str(model.metadata.get("params", {}).get("data", {}).get("source", ""))
    prepared = str(model.metadata.get("params", {}).get("data", {}).get("prepared_dir", ""))
    if source and prepared and path.parent.resolve() == Path(prepared).resolve():  # a split of data.source
        scheme, _, rest = source.partition(":")
        table = (rest if scheme == "sklearn" else scheme) if rest and not Path(source).exists() else Path(source).stem
    else:
        table = path.stem or model.directory.name
    rows = data.get("rows")
    size = f"{rows}x{len(model.schema.features)}" if rows is not None else f"{len(model.schema.features)} columns"
    return f"{table} {size} {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}"


def _param_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _history_metrics(history: pd.DataFrame) -> list[Metric]:
    """Per-epoch curves, step = the epoch counted over both stages; the refit on all rows
    (train.refit) under `refit_` keys of its own. lr and beta only where they changed (a KL
    warm-up, a rollback): otherwise they are the params train.lr and train.beta."""
    now = int(time.time() * 1000)
    phase = history["phase"] if "phase" in history else pd.Series("select", index=history.index)
    step = history["total_epoch"] if "total_epoch" in history else pd.Series(range(1, len(history) + 1))
    keys = [k for k in HISTORY_METRICS if k in history and (k not in SCHEDULES or history[k].nunique() > 1)]
    return [
        Metric(key if p != "refit" else f"refit_{key}", float(value), now, int(epoch))
        for key in keys
        for epoch, value, p in zip(step, history[key], phase, strict=True) if pd.notna(value)
    ]


def _stage(directory: Path, tmp: Path) -> Path:
    """The model directory without its training checkpoint: what a registered version needs."""
    staged = tmp / ARTIFACT_KEY
    shutil.copytree(directory, staged, ignore=shutil.ignore_patterns(CHECKPOINT, ".*.tmp"))
    return staged


def _input_example(model: LoadedModel, frame: pd.DataFrame | None) -> pd.DataFrame | None:
    """A few rows of the training table if it is still there, else of the given table."""
    source = Path(model.metadata.get("data", {}).get("path", ""))
    if source.suffix and source.is_file():
        with contextlib.suppress(PipelineError, StopIteration):
            frame = next(iter_table_batches(source, EXAMPLE_ROWS))  # the head only, whatever the size
    if frame is None or model.schema.problems(frame):
        return None
    return frame[[*model.id_columns, *model.schema.features]].head(EXAMPLE_ROWS).reset_index(drop=True)


def _signature(model: LoadedModel, example: pd.DataFrame | None) -> ModelSignature:
    """Inputs: the id and feature columns with their types; outputs: the embedding frame's.

    MLflow enforces the inputs at predict: a missing column is refused by name, extra columns
    are dropped with a warning. The table contract (Schema.check) still guards every vaepipe step.
    """
    if example is None:
        return ModelSignature(inputs=_schema_inputs(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "integer columns cannot hold NaN": ids
        inferred = infer_signature(example, embed_frame(model, example, embed_params(model)))
    return ModelSignature(inputs=inferred.inputs, outputs=inferred.outputs)


def _schema_inputs(model: LoadedModel) -> MlflowSchema:
    """Without an example: the features' training dtypes; the ids' types are unknown (any)."""
    ids = [ColSpec(AnyType(), c) for c in model.id_columns]
    features = [ColSpec(_mlflow_type(t), c) for c, t in zip(model.schema.features, model.schema.dtypes, strict=True)]
    return MlflowSchema([*ids, *features])


def _mlflow_type(dtype: str) -> DataType:
    kinds = {"bool": DataType.boolean, "boolean": DataType.boolean, "int32": DataType.integer,
             "float32": DataType.float}
    if dtype in kinds:
        return kinds[dtype]
    if dtype.lower() in ("str", "string", "object", "category"):  # a text column, modelled over its levels
        return DataType.string
    return DataType.long if dtype.lower().startswith(("int", "uint")) else DataType.double


def _log_pyfunc(model: LoadedModel, staged: Path, name: str, example: pd.DataFrame | None) -> Any:
    return mlflow.pyfunc.log_model(
        name="model", python_model=str(MODEL_CODE), artifacts={ARTIFACT_KEY: str(staged)},
        input_example=example, signature=_signature(model, example), pip_requirements=pip_requirements(),
        registered_model_name=name,
    )


def _version_tags(model: LoadedModel, metrics: dict[str, Any] | None, run_id: str) -> dict[str, str]:
    tags = {"schema_hash": model.schema.hash, "run_id": run_id}
    if model.metadata.get("validation", {}).get("success") is True:
        tags["validation_status"] = "passed"
    if metrics and _is_scalar(metrics.get("log_likelihood")):
        tags["log_likelihood"] = repr(float(metrics["log_likelihood"]))
    return tags


# ---------------------------------------------------------------- promote


def promote(params: Params, data_path: Path, *, version: str | None = None) -> Promotion:
    """Move @champion to the challenger if its log-likelihood on DATA beats the champion's."""
    stores.configure_tracking()
    name, data_path = params.register.model_name, Path(data_path)
    challenger = _challenger(name, version)
    with promotion_lock(name):  # held from reading @champion to moving it (pipeline.locks)
        return _gate(params, challenger, data_path)


def _gate(params: Params, challenger: str, data_path: Path) -> Promotion:
    name = params.register.model_name
    champion = registered_aliases(MlflowClient(), name, f"models:/{name}").get(CHAMPION)
    if champion == challenger:
        return Promotion(False, challenger, champion, None, None, None,
                         f"version {challenger} of {name} is already @{CHAMPION}; nothing to do")
    if champion is None:
        return _first_champion(params, challenger, data_path)
    return _against_champion(params, challenger, champion, data_path)


def _challenger(name: str, version: str | None) -> str:
    if version is not None:
        return str(resolve_version(f"models:/{name}/{version}").version)
    try:
        return str(resolve_version(f"models:/{name}@{CHALLENGER}").version)
    except PipelineError as exc:
        raise PipelineError(f"no challenger: run vaepipe register first ({exc})") from None


def _version_model(name: str, version: str) -> LoadedModel:
    return load_model_dir(download_model_dir(f"models:/{name}/{version}"))


def _log_likelihood(model: LoadedModel, data_path: Path, params: Params, who: str) -> float:
    try:
        return float(metrics_dict(model, data_path, params.evaluate)["log_likelihood"])
    except PipelineError as exc:
        raise PipelineError(f"{who} cannot be evaluated on {data_path}: {exc}") from None


def _against_champion(params: Params, challenger: str, champion: str, data_path: Path) -> Promotion:
    """The gate: the challenger must beat the champion by register.min_improvement on the same table."""
    name, margin = params.register.model_name, params.register.min_improvement
    new_model, old_model = _version_model(name, challenger), _version_model(name, champion)
    problems = old_model.schema.problems(_contract_frame(new_model.schema))
    if problems:  # registered before registration checked it: no gate between two tables
        raise _contract_error(f"version {challenger} of {name}", name, champion, old_model.schema, problems,
                              params.data.source, "on one table; nothing moves")
    ll_new = _log_likelihood(new_model, data_path, params, f"challenger version {challenger}")
    ll_old = _log_likelihood(old_model, data_path, params, f"champion version {champion}")
    required = ll_old + margin
    tags = {"gate_champion_version": champion, "gate_champion_log_likelihood": repr(ll_old),
            "gate_required": repr(required)}
    if not (math.isfinite(ll_new) and ll_new > required):
        _tag(name, challenger, {**_gate_tags(ll_new, data_path, "refused"), **tags})
        message = (f"promotion refused: version {challenger} of {name} scores log-likelihood {ll_new:.4f} nats/row "
                   f"on {data_path}, which does not beat champion version {champion} ({ll_old:.4f}) + "
                   f"register.min_improvement {margin:g} = {required:.4f}; @{CHAMPION} stays on version {champion}")
        raise GateRefused(message, Promotion(False, challenger, champion, ll_new, ll_old, required, message))
    _crown(name, challenger, champion, {**_gate_tags(ll_new, data_path, "promoted"), **tags})
    return Promotion(True, challenger, champion, ll_new, ll_old, required,
                     f"version {challenger} of {name} is now @{CHAMPION}: log-likelihood {ll_new:.4f} > "
                     f"{ll_old:.4f} (version {champion}) + {margin:g} on {data_path}")


def _first_champion(params: Params, challenger: str, data_path: Path) -> Promotion:
    """No champion yet: DATA must pass validation against the challenger, whose likelihood must be finite."""
    name = params.register.model_name
    model = _version_model(name, challenger)
    report = validate_table(read_table(data_path), data=params.data, params=params.validate,
                            against=model.schema, where=str(data_path))
    if not report.success:
        failed = [c.line() for c in report.failures()]
        raise ValidationFailed(f"promotion refused: {data_path} fails validation against version "
                               f"{challenger} of {name}: {'; '.join(failed[:5])}")
    ll_new = _log_likelihood(model, data_path, params, f"challenger version {challenger}")
    if not math.isfinite(ll_new):
        _tag(name, challenger, _gate_tags(ll_new, data_path, "refused"))
        message = (f"promotion refused: version {challenger} of {name} scores a non-finite "
                   f"log-likelihood ({ll_new}) on {data_path}")
        raise GateRefused(message, Promotion(False, challenger, None, ll_new, None, None, message))
    _crown(name, challenger, None, {**_gate_tags(ll_new, data_path, "promoted"), "validation_status": "passed"})
    return Promotion(True, challenger, None, ll_new, None, None,
                     f"version {challenger} of {name} is now @{CHAMPION} (there was none): validation of "
                     f"{data_path} passed, log-likelihood {ll_new:.4f} nats/row")


def _gate_tags(ll_new: float, data_path: Path, result: str) -> dict[str, str]:
    return {"gate_result": result, "gate_log_likelihood": repr(ll_new), "gate_data": str(data_path),
            "gated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _tag(name: str, version: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _crown(name: str, challenger: str, expected: str | None, tags: dict[str, str]) -> None:
    """Set @champion unless it moved while the gate ran (cannot happen under promotion_lock)."""
    client = MlflowClient()
    now = registered_aliases(client, name, f"models:/{name}").get(CHAMPION)
    if now != expected:
        raise PipelineError(f"@{CHAMPION} of {name} moved to version {now} while the gate ran; run promote again")
    _tag(name, challenger, {**tags, "promoted_at": tags["gated_at"]})
    client.set_registered_model_alias(name, CHAMPION, challenger)


def current_champion(name: str) -> str | None:
    """The version @champion of NAME points at; None when there is none (or no such model yet)."""
    stores.configure_tracking()
    try:
        version = MlflowClient().get_registered_model(name).aliases.get(CHAMPION)
    except MlflowException as exc:
        if not not_found(exc):
            raise
        return None
    return None if version is None else str(version)


# ---------------------------------------------------------------- listing


@dataclass(frozen=True)
class VersionRow:
    """One registered version as `vaepipe models` lists it."""

    version: str
    aliases: tuple[str, ...]
    created: str  # UTC, to the minute
    log_likelihood: float | None  # held-out nats/row logged at registration
    gate: str  # the gate's last verdict on it ("" when never gated)
    schema_hash: str


def list_versions(name: str) -> list[VersionRow]:
    """Every version of registered model NAME, newest first; [] when nothing is registered yet.

    Reads an existing store only: with no sqlite file yet, nothing is registered, and none is created.
    """
    db = stores.sqlite_path(stores.check_store())
    if db is not None and not db.exists():
        return []
    stores.configure_tracking()
    client = MlflowClient()
    try:
        aliases = registered_aliases(client, name, f"models:/{name}")
    except PipelineError:
        if not client.search_registered_models(max_results=1):
            return []
        raise
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(version, []).append(alias)
    rows = [_version_row(mv, tuple(sorted(by_version.get(str(mv.version), []))))
            for mv in client.search_model_versions(f"name = '{name}'")]
    return sorted(rows, key=lambda r: -int(r.version))


def _version_row(mv: ModelVersion, aliases: tuple[str, ...]) -> VersionRow:
    tags = mv.tags or {}
    ll = tags.get("log_likelihood")
    created = time.strftime("%Y-%m-%d %H:%M", time.gmtime((mv.creation_timestamp or 0) / 1000))
    return VersionRow(str(mv.version), aliases, created, None if ll is None else float(ll),
                      tags.get("gate_result", ""), tags.get("schema_hash", "")[:12])
