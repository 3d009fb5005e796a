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

from pipeline.contract.columns import FLOAT32_MAX, is_numeric_dtype, to_tensor
from pipeline.contract.schema import Schema
from pipeline.errors import PipelineError
from vae import VAE, VAEError, check_log_domain, check_values, load_model, read_manifest
from vae.calibration import MissingAdjustment


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

    def features(self, df: pd.DataFrame, where: str, first_row: int = 0) -> torch.Tensor:
        """The table's feature columns as the model reads them, (N, D) float32; a table that breaks
        the contract, or a NaN or inf cell the model cannot take, is refused by column and row.

        One copy and one pass over the cells when the table is fine (a streamed batch): the
        contract from df's dtypes at once, the cells from their least and greatest float32. Only a
        table that fails those takes the checks that name columns and rows (each a pass per column).
        Text columns become their level codes; a level unseen in training is named with its row
        (first_row: the position of df's first row in its file, for that message).
        """
        if not self._fits(df):
            self.schema.check(df, where)
        y = self._coded(df, where, first_row) if self.schema.categorical else self._numeric(df, where)
        if self.vae.any_log:
            try:
                check_log_domain(y, self.vae.spec, first_row)
            except VAEError as exc:
                raise PipelineError(f"{where}: {exc}") from None
        return y

    def _numeric(self, df: pd.DataFrame, where: str) -> torch.Tensor:
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

    def _coded(self, df: pd.DataFrame, where: str, first_row: int) -> torch.Tensor:
        """features() of a model with text columns: numeric cells checked as there, levels coded."""
        s = self.schema
        y = torch.from_numpy(s.codes(df, where, first_row))
        numeric = [name for j, name in enumerate(s.features) if not s.levels_of(j)]
        if numeric and not bool(torch.isfinite(y.sum())):
            to_tensor(s.features_in_order(df)[numeric], where)  # a cell beyond float32's range, by column and row
        try:
            if not bool(torch.isfinite(y.sum())):
                check_values(y, s.features, self.vae.spec.missing)
        except VAEError as exc:
            raise PipelineError(f"{where}: {exc}") from None
        return y

    def _fits(self, df: pd.DataFrame) -> bool:
        """Whether df holds exactly the id and feature columns (and any dropped ones), the features
        numeric or, where the model has levels, of any dtype (Schema.problems() == [])."""
        s = self.schema
        extra = len([c for c in s.dropped if c in df.columns]) if s.dropped else 0
        if len(df.columns) != len(s.features) + len(s.id_columns) + extra or not set(df.columns) <= {
                *s.features, *s.id_columns, *s.dropped}:
            return False
        cats = {s.features[j] for j in s.categorical}
        return all(is_numeric_dtype(t) or c in cats for c, t in df.dtypes[list(s.features)].items())

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


