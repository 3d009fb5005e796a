"""The train step: a table in, a self-contained, resumable model directory out."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Params
from pipeline.errors import PipelineError
from pipeline.schema import Schema
from pipeline.tables import read_table, split_features, to_tensor
from vae import (
    VAE,
    EpochStats,
    VAEError,
    anomaly_threshold,
    describe_table,
    fit,
    load_checkpoint,
    save_checkpoint,
    save_model,
    score_rows,
)
from vae.store import CHECKPOINT, MANIFEST, write_atomic

log = logging.getLogger(__name__)
RUN_FILE = "run.json"  # what a resumed run must match: params and data
MAX_THRESHOLD_ROWS = 20_000  # rows scored to place the anomaly threshold


@dataclass(frozen=True)
class TrainSummary:
    directory: Path
    epochs: int
    best_epoch: int
    stopped_early: bool
    best_val_elbo: float | None
    anomaly_threshold: float | None
    seconds: float


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load(path: Path, params: Params, schema: Schema | None = None) -> tuple[torch.Tensor, Schema]:
    df = read_table(path)
    if schema is not None:
        schema.check(df, str(path))
        df = df[[*schema.id_columns, *schema.features]]
    _, features = split_features(df, params.data.id_columns, str(path))
    return to_tensor(features), schema or Schema.from_frame(df, params.data.id_columns)


def _check_out_dir(out: Path, resume: bool) -> None:
    finished, interrupted = (out / MANIFEST).exists(), (out / CHECKPOINT).exists()
    if resume and finished:
        raise PipelineError(f"{out} already holds a finished model; nothing to resume")
    if resume and not interrupted:
        raise PipelineError(f"{out} holds no interrupted run to resume ({CHECKPOINT} is missing)")
    if not resume and finished:
        raise PipelineError(f"{out} already holds a trained model; choose another --out or delete it")
    if not resume and interrupted:
        raise PipelineError(f"{out} holds an interrupted run; continue it with --resume or delete it")
    if not resume and out.exists() and any(out.iterdir()):
        raise PipelineError(f"--out {out} exists and is not empty; choose a new directory")


def _run_record(params: Params, data_path: Path, val_path: Path | None) -> dict[str, Any]:
    return {
        "params": params.to_dict(),
        "data": {"path": str(data_path), "sha256": file_sha256(data_path)},
        "val": None if val_path is None else {"path": str(val_path), "sha256": file_sha256(val_path)},
    }


def _check_resume(out: Path, record: dict[str, Any]) -> None:
    saved = json.loads((out / RUN_FILE).read_text())
    for key in ("params", "data", "val"):
        old, new = saved.get(key), record.get(key)
        if key != "params":
            old, new = old and old["sha256"], new and new["sha256"]
        if old != new:
            raise PipelineError(f"--resume into {out}: the {key} differ from the interrupted run's; use the same ones")


def train_model(
    data_path: Path,
    out: Path,
    params: Params,
    *,
    resume: bool = False,
    val_path: Path | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    validated: bool = False,
) -> TrainSummary:
    """Fit a VAE on DATA into OUT; checkpoints every epoch so that --resume can continue.

    validated: the caller validated DATA (recorded in the model's metadata for the registry).
    """
    data_path, out = Path(data_path), Path(out)
    _check_out_dir(out, resume)
    y, schema = _load(data_path, params)
    y_val = None if val_path is None else _load(Path(val_path), params, schema)[0]
    record = _run_record(params, data_path, val_path)
    try:
        spec = describe_table(
            y, schema.features, likelihood=params.model.likelihood,
            standardize=params.data.standardize, missing=params.data.missing,
        )
        vae = VAE(spec, params.model, seed=params.train.seed)
    except VAEError as exc:
        raise PipelineError(f"{data_path}: {exc}") from None
    if resume:
        _check_resume(out, record)
    created = not out.exists()
    write_atomic(out / RUN_FILE, json.dumps(record, indent=2).encode())
    try:
        result = fit(
            vae, y, params.train, y_val=y_val,
            resume=load_checkpoint(out) if resume else None,
            on_epoch=on_epoch, on_checkpoint=lambda state: save_checkpoint(out, state),
        )
        threshold = _anomaly_threshold(vae, y, params)
    except VAEError as exc:
        if created:
            shutil.rmtree(out, ignore_errors=True)  # nothing half-written
        raise PipelineError(f"{data_path}: {exc}") from None
    metadata = {
        "schema": schema.to_dict(),
        "params": params.to_dict(),
        "data": record["data"],
        "validation": {"success": validated},
        "anomaly": {"quantile": params.embed.anomaly_quantile, "threshold": threshold,
                    "score_samples": params.embed.score_samples},
    }
    save_model(out, vae, params.train, result.history, metadata)
    best = [h.val_elbo for h in result.history if h.epoch == result.best_epoch]
    return TrainSummary(out, len(result.history), result.best_epoch, result.stopped_early,
                        best[0] if best else None, threshold, sum(h.seconds for h in result.history))


def _anomaly_threshold(vae: VAE, y: torch.Tensor, params: Params) -> float | None:
    """The embed.anomaly_quantile of training rows' log-likelihood (embed.score_samples each)."""
    if params.embed.score_samples == 0:
        return None
    if y.shape[0] > MAX_THRESHOLD_ROWS:
        y = y[torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(params.embed.seed))[:MAX_THRESHOLD_ROWS]]
    scores = score_rows(vae, y, params.embed.score_samples, params.embed.seed)
    return anomaly_threshold(scores.log_likelihood, params.embed.anomaly_quantile)
