"""Prefect flows: they only compose tasks; every task wraps one step function in a few lines."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline import steps
from pipeline.config import Params, load_params


@task(cache_policy=NO_CACHE)
def prepare_task(params: Params) -> dict[str, Path]:
    return steps.prepare_data(params)


@task(cache_policy=NO_CACHE)  # bad data is not retried: it will not get better
def validate_task(path: Path, params: Params) -> None:
    report = steps.validate_data(path, params, raise_on_failure=False)
    create_markdown_artifact(
        key="validation", markdown="\n".join(["## Validation", "", *[f"- {line}" for line in report.summary_lines()]]),
        description=f"validation of {path}",
    )
    steps.raise_if_failed(report, path)


@task(cache_policy=NO_CACHE)
def train_task(path: Path, out: Path, params: Params, val_path: Path | None) -> Path:
    logger = get_run_logger()
    summary = steps.train(path, out, params, val_path=val_path, validate=False, validated=True,
                          on_epoch=lambda s: logger.info(steps.epoch_line(s, params.train.epochs)))
    return summary.directory


@task(cache_policy=NO_CACHE)
def evaluate_task(model_dir: Path, path: Path, params: Params) -> dict[str, Any]:
    metrics = steps.evaluate(str(model_dir), path, params, json_path=model_dir / "metrics.json")
    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    create_table_artifact(key="metrics", table=[{"metric": k, "value": v} for k, v in scalars.items()],
                          description=f"held-out metrics of {model_dir} on {path} (nats per row)")
    return metrics


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])  # store access can be busy
def register_task(model_dir: Path, params: Params, metrics: dict[str, Any], table: Path) -> str:
    return steps.register(model_dir, params, metrics=metrics, table=table).version


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def promote_task(params: Params, version: str, data: Path) -> dict[str, Any]:
    return steps.promote(params, version=version, data=data, refuse_raises=False)


@flow(name="vaepipe-train", log_prints=True)
def training_flow(params_path: str | None = None, overrides: list[str] | None = None, out: str | None = None) -> dict[str, Any]:
    """prepare -> validate -> train -> evaluate -> register -> promote, on params.yaml's data."""
    params = load_params(Path(params_path) if params_path else None, overrides or [])
    started = time.perf_counter()
    splits = prepare_task(params)
    validate_task(splits["train"], params)
    model_dir = train_task(splits["train"], Path(out) if out else steps.new_run_dir(), params, splits["val"])
    metrics = evaluate_task(model_dir, splits["test"], params)
    version = register_task(model_dir, params, metrics, splits["test"])
    promotion = promote_task(params, version, splits["test"])
    return {"model_dir": str(model_dir), "metrics": metrics, "version": version,
            "promotion": promotion, "seconds": time.perf_counter() - started}
