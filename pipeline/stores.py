"""Where MLflow keeps its runs, registry and artifacts (DESIGN.md, "Stores").

MLFLOW_TRACKING_URI if set, else an embedded sqlite store `<cwd>/mlflow/mlflow.db` with artifacts
in `<cwd>/mlflow/artifacts`; every path absolute, so pytest, DVC and Prefect share one store.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

STORE_DIR = "mlflow"  # under the cwd; holds data only, never a .py file (it would shadow mlflow)
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
CACHE_DIR = "cache"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else sqlite:///<abs cwd>/mlflow/mlflow.db (the folder is created)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    root = Path.cwd().resolve() / STORE_DIR
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / DB_FILE}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative paths against the cwd); None otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    return path if path.is_absolute() else Path.cwd().resolve() / path


def store_root() -> Path:
    """The folder of the embedded store: beside the sqlite file, else <cwd>/mlflow."""
    db = sqlite_path(tracking_uri())
    return db.parent if db is not None else Path.cwd().resolve() / STORE_DIR


def artifact_location() -> str | None:
    """A file URI beside a sqlite store; None lets a real server choose."""
    if sqlite_path(tracking_uri()) is None:
        return None
    path = store_root() / ARTIFACTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def cache_dir() -> Path:
    """Downloaded registry artifacts, reused between calls (see pipeline.registry)."""
    return store_root() / CACHE_DIR


def configure_tracking() -> str:
    """Point MLflow's tracking, and so its registry, at the store; returns the URI.

    The registry follows the tracking URI unless MLFLOW_REGISTRY_URI names another one. It is
    not set here: mlflow.set_registry_uri is process-global and outranks the tracking URI even
    of an explicit MlflowClient(tracking_uri=...), so a later store would still register into this one.
    """
    uri = tracking_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep CLI output to log lines
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)  # also exported as MLFLOW_TRACKING_URI for subprocesses
    return uri


def configure_mlflow(experiment: str) -> str:
    """Tracking (and registry) URI and the active experiment, created with our artifact location; its id."""
    configure_tracking()
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            client.create_experiment(experiment, artifact_location=artifact_location())
        except MlflowException as exc:  # another process created it between our two calls
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
    return mlflow.set_experiment(experiment).experiment_id
