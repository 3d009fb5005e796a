"""Registered versions: models:/NAME@ALIAS or models:/NAME/VERSION to a version and its model
directory, downloaded once into the store's cache; the aliases; every version as `vaepipe models`
lists it. Imports no vaepipe step, so that resolving MODEL (pipeline.registry.resolve) does not
import the registry's register and gate."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from pipeline import stores
from pipeline.errors import PipelineError

ARTIFACT_KEY = "model_dir"  # the pyfunc's context.artifacts key of the model directory
CHALLENGER, CHAMPION = "challenger", "champion"
REF = re.compile(r"models:/(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))")


def not_found(exc: MlflowException) -> bool:
    return exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def registered_aliases(client: MlflowClient, name: str, ref: str) -> dict[str, str]:
    """alias -> version of a registered model; PipelineError naming ref when there is no such model."""
    try:
        return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    except MlflowException as exc:
        if not not_found(exc):
            raise
    known = [m.name for m in client.search_registered_models(max_results=20)]
    raise PipelineError(f"{ref}: no registered model named {name!r}; registered models: "
                        f"{', '.join(known) or 'none (run vaepipe register first)'}")


def resolve_version(ref: str) -> ModelVersion:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> its ModelVersion; PipelineError naming ref."""
    match = REF.fullmatch(ref.strip())
    if not match:
        raise PipelineError(f"{ref}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, version = match["name"], match["alias"], match["version"]
    client = MlflowClient()
    aliases = registered_aliases(client, name, ref)
    if alias is not None:
        if alias not in aliases:
            raise PipelineError(f"{ref}: no such alias; registered aliases: {', '.join(sorted(aliases)) or 'none'}")
        version = aliases[alias]
    try:
        return client.get_model_version(name, str(int(version)))
    except (ValueError, MlflowException) as exc:
        if isinstance(exc, MlflowException) and not not_found(exc):
            raise
    known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    raise PipelineError(f"{ref}: no such version; versions of {name}: {', '.join(map(str, known)) or 'none'}")


def download_model_dir(ref: str) -> Path:
    """The model directory of a registered version, downloaded once into the store's cache."""
    return download_version(ref)[0]


def download_version(ref: str) -> tuple[Path, ModelVersion]:
    """download_model_dir and the version it resolved (an alias is read once)."""
    db = stores.sqlite_path(stores.check_store())
    if db is not None and not db.exists():  # reading a model would create an empty store here
        found = REF.fullmatch(ref)
        name = found["name"] if found else ref
        raise PipelineError(f"{ref}: no model {name!r} is registered: there is no MLflow store at {db} yet; register "
                            "one (`vaepipe register`, `make run`) or point MLFLOW_TRACKING_URI at your store")
    stores.configure_tracking()
    mv = resolve_version(ref)
    key = re.sub(r"[^\w.-]", "_", f"{mv.version}-{(mv.source or '').rsplit('/', 1)[-1]}")
    target = stores.cache_dir() / re.sub(r"[^\w.-]", "_", mv.name) / key
    if not (target / "MLmodel").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(tmp))
            _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _model_dir_in(target, ref), mv


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished download into place; a concurrent process may have won the race."""
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier download (no MLmodel)
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "MLmodel").exists():
            raise


def _model_dir_in(root: Path, ref: str) -> Path:
    artifacts = Model.load(str(root / "MLmodel")).flavors.get("python_function", {}).get("artifacts", {})
    if ARTIFACT_KEY not in artifacts:
        raise PipelineError(f"{ref}: not a vaepipe model (its pyfunc has no {ARTIFACT_KEY!r} artifact)")
    return root / artifacts[ARTIFACT_KEY]["path"]


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
