"""The register step: one MLflow run per model (params, curves, metrics, plots, lineage tags) and
a new registered version, a pyfunc (pipeline.registry.pyfunc) around the model directory.

Aliases: `challenger` (registered, not yet gated) and `champion` (moved only by the gate,
pipeline.registry.gate). Registration is idempotent: the same trained model, the same version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
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
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import ColSpec, DataType
from mlflow.types import Schema as MlflowSchema
from mlflow.types.schema import AnyType

from pipeline import stores
from pipeline.config import Params
from pipeline.contract.model import LoadedModel, load_model_dir
from pipeline.errors import PipelineError
from pipeline.io.hashing import file_sha256
from pipeline.io.tables import iter_table_batches, read_table
from pipeline.registry import plots
from pipeline.registry.champion import check_champion_contract, contract_frame
from pipeline.registry.lineage import lineage_tags
from pipeline.registry.pyfunc import MODEL_CODE, embed_params, pip_requirements
from pipeline.registry.versions import ARTIFACT_KEY, CHALLENGER
from pipeline.stages.embed import embed_frame
from vae.store import CHECKPOINT, HISTORY, MANIFEST, WEIGHTS
from vae.terms import VAL_LOG_LIKELIHOOD, history_columns

SCHEDULES = ("lr", "beta")  # logged per epoch only when they change
HISTORY_METRICS = (*history_columns(), VAL_LOG_LIKELIHOOD, *SCHEDULES)  # train_elbo, ..., val_kl, val_log_likelihood, lr, beta
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
    check_champion_contract(contract_frame(model.schema), name, str(model.directory), params.data.source)
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
