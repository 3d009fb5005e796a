"""Lineage of a registered model: code commit, data hash (DVC or the model's own), config, versions."""

from __future__ import annotations

import json
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import yaml

from pipeline.contract.model import LoadedModel

MAX_TAG_CHARS = 5000  # MLflow keeps tag values up to 8000 characters


def lineage_tags(model: LoadedModel, config: dict[str, Any]) -> dict[str, str]:
    """Where the model came from: code, data, config, seed, library versions, table contract."""
    data_hash, source = _data_hash(model)
    return {
        "git_commit": _git_commit(),
        "data_hash": data_hash,
        "data_hash_source": source,
        "config": json.dumps(config, sort_keys=True)[:MAX_TAG_CHARS],
        "seed": str(config.get("train", {}).get("seed", "unknown")),
        "schema_hash": model.schema.hash,
        **{f"version.{lib}": _version(lib) for lib in ("torch", "mlflow", "prefect", "vaepipe")},
    }


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _data_hash(model: LoadedModel) -> tuple[str, str]:
    """md5 of the train stage's data dependency in ./dvc.lock, else the sha256 the model recorded."""
    md5 = _dvc_train_md5(Path("dvc.lock"), model.metadata.get("data", {}).get("path"))
    if md5 is not None:
        return f"md5:{md5}", "dvc.lock"
    sha = model.metadata.get("data", {}).get("sha256")
    return (f"sha256:{sha}", "model metadata") if sha else ("unknown", "none")


def _dvc_train_md5(lock: Path, data_path: str | None) -> str | None:
    """The lock's md5 of the table the model was trained on (a stale lock for another table: None)."""
    try:
        deps = yaml.safe_load(lock.read_text())["stages"]["train"]["deps"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    hashed = [d for d in deps if isinstance(d, dict) and d.get("md5") and d.get("path")]
    if data_path:
        hashed = [d for d in hashed if Path(d["path"]).resolve() == Path(data_path).resolve()]
    else:
        hashed = [d for d in hashed if str(d["path"]).startswith("data")]
    return str(hashed[0]["md5"]) if hashed else None


def _version(dist: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "not installed"
