"""A trained model as the pipeline sees it: the VAE, its table contract and its settings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.schema import Schema
from vae import VAE, VAEError, load_model, read_manifest


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


def resolve_model(ref: str, device: str = "cpu") -> LoadedModel:
    """MODEL on the command line: a model directory, or models:/NAME@ALIAS, models:/NAME/VERSION."""
    if ref.startswith("models:/"):
        from pipeline.registry import download_model_dir

        return load_model_dir(download_model_dir(ref), device)
    path = Path(ref)
    if not path.exists():
        raise PipelineError(f"model {ref} does not exist (a model directory from `vaepipe train`, or models:/NAME@ALIAS)")
    return load_model_dir(path, device)
