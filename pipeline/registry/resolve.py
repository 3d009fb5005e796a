"""MODEL as the commands take it: a model directory written by `vaepipe train`, or models:/NAME@ALIAS,
models:/NAME/VERSION. MLflow is imported only for a models:/ URI (pipeline.registry.versions)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.contract.model import LoadedModel, load_model_dir
from pipeline.errors import PipelineError
from pipeline.io.hashing import file_sha256
from vae.store import WEIGHTS


@dataclass(frozen=True)
class ResolvedModel:
    directory: Path  # a local model directory
    version: str  # models:/NAME/VERSION for a registered one, else sha256:<weights.pt> of the directory


def resolve_ref(ref: str) -> ResolvedModel:
    """MODEL resolved once: what a registry alias points at now, or a directory and its weights' hash."""
    if ref.startswith("models:/"):
        from pipeline.stores import check_store

        check_store()  # before the slow imports: a dead server fails in seconds
        from pipeline.registry.versions import download_version

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
        from pipeline.registry.versions import download_model_dir

        return load_model_dir(download_model_dir(ref), device)
    path = Path(ref)
    if not path.exists():
        raise PipelineError(f"model {ref} does not exist (a model directory from `vaepipe train`, or models:/NAME@ALIAS)")
    return load_model_dir(path, device)

