"""A trained model as the pipeline sees it: the VAE, its table contract and its settings."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.errors import PipelineError
from pipeline.schema import Schema
from pipeline.tables import FLOAT32_MAX, file_sha256, is_numeric_dtype, to_tensor
from vae import VAE, VAEError, check_values, load_model, read_manifest
from vae.calibration import MissingAdjustment
from vae.store import WEIGHTS


@dataclass(frozen=True)
class LoadedModel:
    vae: VAE
    schema: Schema
    directory: Path
    metadata: dict[str, Any]

    @property
    def anomaly_threshold(self) -> float | None:
        value = self.metadata.get("anomaly", {}).get("threshold")
        return None if value is None else float(value)

    @property
    def anomaly_quantile(self) -> float | None:
        value = self.metadata.get("anomaly", {}).get("quantile")
        return None if value is None else float(value)

    @cached_property
    def missing_adjustment(self) -> MissingAdjustment | None:
        """A data.missing: mask model's adjustment of scores for the missing cells (vae.calibration);
        None for other models and those trained before it (their flag is log_likelihood < threshold)."""
        record = self.metadata.get("anomaly", {}).get("missing")
        return None if record is None else MissingAdjustment.from_dict(record)

    def score_settings(self, score_samples: int, seed: int) -> tuple[int, int]:
        """(importance samples, seed) for the score columns: those the anomaly threshold was
        placed with, whatever embed.* says now, so that the flag means what it meant at training."""
        anomaly = self.metadata.get("anomaly", {})
        if anomaly.get("threshold") is None:
            return score_samples, seed
        stored = int(anomaly["score_samples"]), int(anomaly.get("seed", 0))
        if stored != (score_samples, seed):
            warnings.warn(f"scoring with the model's embed.score_samples={stored[0]} and embed.seed={stored[1]} "
                          f"(its anomaly threshold was placed with them), not {score_samples} and {seed}", stacklevel=2)
        return stored

    def features(self, df: pd.DataFrame, where: str) -> torch.Tensor:
        """The table's feature columns as the model reads them, (N, D) float32; a table that breaks
        the contract, or a NaN or inf cell the model cannot take, is refused by column and row.

        One copy and one pass over the cells when the table is fine (a streamed batch): the
        contract from df's dtypes at once, the cells from their least and greatest float32. Only a
        table that fails those takes the checks that name columns and rows (each a pass per column).
        """
        if not self._fits(df):
            self.schema.check(df, where)
        frame = self.schema.features_in_order(df)
        with np.errstate(over="ignore"):  # a float64 beyond float32's range: named below
            cells = frame.to_numpy(dtype=np.float32, na_value=np.nan, copy=True)  # (N, D), column-major
        if cells.size and cells.min() > -FLOAT32_MAX and cells.max() < FLOAT32_MAX:  # False with a NaN
            return torch.from_numpy(cells)
        y = to_tensor(frame, where)  # a cell beyond float32's range is refused by column and row
        try:
            if not bool(torch.isfinite(y.sum())):  # a NaN or inf cell (or an overflow): find and name it
                check_values(y, self.schema.features, self.vae.spec.missing)
        except VAEError as exc:
            raise PipelineError(f"{where}: {exc}") from None
        return y

    def _fits(self, df: pd.DataFrame) -> bool:
        """Whether df holds exactly the id and feature columns, the features numeric (Schema.problems() == [])."""
        s = self.schema
        if len(df.columns) != len(s.features) + len(s.id_columns) or set(df.columns) != {*s.features, *s.id_columns}:
            return False
        return all(is_numeric_dtype(t) for t in df.dtypes[list(s.features)])

    @property
    def id_columns(self) -> tuple[str, ...]:
        return self.schema.id_columns

    def metrics(self) -> dict[str, Any] | None:
        """The metrics JSON written next to the model by `evaluate`, if any."""
        path = self.directory / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else None


def load_model_dir(directory: Path, device: str = "cpu") -> LoadedModel:
    try:
        manifest = read_manifest(directory)
        vae = load_model(directory, device)
    except VAEError as exc:
        raise PipelineError(str(exc)) from None
    metadata = manifest.get("metadata", {})
    if "schema" not in metadata:
        raise PipelineError(f"{directory}: {directory / 'model.json'} carries no table schema; retrain with vaepipe train")
    return LoadedModel(vae, Schema.from_dict(metadata["schema"]), Path(directory), metadata)


@dataclass(frozen=True)
class ResolvedModel:
    directory: Path  # a local model directory
    version: str  # models:/NAME/VERSION for a registered one, else sha256:<weights.pt> of the directory


def resolve_ref(ref: str) -> ResolvedModel:
    """MODEL resolved once: what a registry alias points at now, or a directory and its weights' hash."""
    if ref.startswith("models:/"):
        from pipeline.stores import check_store

        check_store()  # before the slow imports: a dead server fails in seconds
        from pipeline.registry import download_version

        directory, mv = download_version(ref)
        return ResolvedModel(directory, f"models:/{mv.name}/{mv.version}")
    path = Path(ref)
    if not path.exists():
        raise PipelineError(f"model {ref} does not exist (a model directory from `vaepipe train`, or models:/NAME@ALIAS)")
    weights = path / WEIGHTS  # if missing, loading the directory names what is wrong
    return ResolvedModel(path, f"sha256:{file_sha256(weights)}" if weights.is_file() else "unknown")


def resolve_model(ref: str, device: str = "cpu") -> LoadedModel:
    """MODEL on the command line: a model directory, or models:/NAME@ALIAS, models:/NAME/VERSION."""
    if ref.startswith("models:/"):
        from pipeline.stores import check_store

        check_store()  # before the slow imports: a dead server fails in seconds
        from pipeline.registry import download_model_dir

        return load_model_dir(download_model_dir(ref), device)
    path = Path(ref)
    if not path.exists():
        raise PipelineError(f"model {ref} does not exist (a model directory from `vaepipe train`, or models:/NAME@ALIAS)")
    return load_model_dir(path, device)
