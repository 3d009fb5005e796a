"""Entry points shared by the CLI, the Prefect tasks and the dvc.yaml stages.

Each composes a step module's plain function with what every caller needs around it
(resolving MODEL, validating before training, writing outputs), so there is one implementation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import embed as embed_step
from pipeline import evaluate as evaluate_step
from pipeline import prepare as prepare_step
from pipeline import train as train_step
from pipeline import validate as validate_step
from pipeline.config import Params
from pipeline.errors import GateRefused, PipelineError, ValidationFailed
from pipeline.model import resolve_model
from vae import EpochStats


def prepare_data(params: Params) -> dict[str, Path]:
    return prepare_step.prepare(params.data, params.train.val_fraction, Path(params.data.prepared_dir))


def default_eval_table(params: Params) -> Path:
    path = Path(params.data.prepared_dir) / "test.parquet"
    if not path.exists():
        raise PipelineError(f"no evaluation table: {path} does not exist (run `dvc repro` or pass --data)")
    return path


def raise_if_failed(report: validate_step.ValidationReport, path: Path) -> None:
    if not report.success:
        lines = [f"{c.name} ({c.column})" if c.column else c.name for c in report.failures()]
        raise ValidationFailed(f"{path} failed validation: {'; '.join(lines[:5])}" + (" ..." if len(lines) > 5 else ""))


def validate_data(
    path: Path, params: Params, against: str | None = None, report_path: Path | None = None,
    raise_on_failure: bool = True,
) -> validate_step.ValidationReport:
    schema = resolve_model(against).schema if against else None
    report = validate_step.validate_path(Path(path), params, against=schema, report_path=report_path)
    if raise_on_failure:
        raise_if_failed(report, path)
    return report


def train(
    path: Path, out: Path, params: Params, *, resume: bool = False, val_path: Path | None = None,
    validate: bool = True, validated: bool = False, on_epoch: Callable[[EpochStats], None] | None = None,
) -> train_step.TrainSummary:
    """Validate the table (data.* and validate.* policies) unless the caller did, then fit into OUT."""
    if validate:
        validate_data(path, params)
    return train_step.train_model(Path(path), Path(out), params, resume=resume, val_path=val_path,
                                  on_epoch=on_epoch, validated=validate or validated)


def evaluate(model: str, path: Path, params: Params, json_path: Path | None = None) -> dict[str, Any]:
    metrics = evaluate_step.metrics_dict(resolve_model(model), Path(path), params.evaluate)
    if json_path is not None:
        evaluate_step.write_metrics(metrics, Path(json_path))
    return metrics


def embed(model: str, input_path: Path, output: Path, params: Params,
          on_batch: Callable[[int], None] | None = None) -> int:
    return embed_step.embed_file(resolve_model(model), Path(input_path), Path(output), params.embed, on_batch)


def sample(model: str, n: int, output: Path, params: Params) -> int:
    return len(embed_step.sample_file(resolve_model(model), n, Path(output), params.embed.seed))


def register(model_dir: Path, params: Params, *, alias: str = "challenger",
             metrics: dict[str, Any] | None = None, table: Path | None = None) -> Any:
    from pipeline.registry import register_model

    return register_model(Path(model_dir), params, alias=alias, metrics=metrics, table=table)


def promote(params: Params, *, version: str | None = None, data: Path | None = None,
            refuse_raises: bool = True) -> dict[str, Any]:
    """The gate; a refusal raises GateRefused unless refuse_raises is False (then it is reported)."""
    from pipeline.registry import promote as gate

    try:
        result = gate(params, Path(data) if data else default_eval_table(params), version=version)
    except GateRefused as exc:
        if refuse_raises:
            raise
        return {"promoted": False, "message": str(exc)}
    return {"promoted": result.promoted, "message": result.message,
            "challenger_version": result.challenger_version, "champion_version": result.champion_version}


def new_run_dir(root: Path = Path("models/runs")) -> Path:
    return root / time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def epoch_line(s: EpochStats, epochs: int) -> str:
    val = "" if s.val_elbo is None else f"  val ELBO {s.val_elbo:.3f}"
    return f"epoch {s.epoch}/{epochs}  ELBO {s.train_elbo:.3f}  recon {s.train_recon:.3f}  KL {s.train_kl:.3f}{val}"
