"""Where MLflow keeps its runs, registry and artifacts (docs/architecture.md, "Contracts").

MLFLOW_TRACKING_URI if set, else an embedded sqlite store `<cwd>/mlflow/mlflow.db` with artifacts
in `<cwd>/mlflow/artifacts`; every path absolute, so pytest, DVC and Prefect share one store.
"""

from __future__ import annotations

import http.client
import os
import ssl
import time
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from pipeline.errors import StoreUnreachable

STORE_DIR = "mlflow"  # under the cwd; holds data only, never a .py file (it would shadow mlflow)
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
CACHE_DIR = "cache"
PROBE_DELAYS = (0.5, 1.0)  # seconds between the attempts to reach a store server: 3 attempts
PROBE_TIMEOUT = 3.0  # seconds one attempt (connect, request, first answer) may take
# MLflow's own HTTP retries (defaults: 7 tries up to 120 s each, ~4 minutes against a dead server),
# bounded for the calls after the probe; a user's own setting wins
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else sqlite:///<abs cwd>/mlflow/mlflow.db. Creates nothing: the writers
    do (configure_tracking, artifact_location, the promotion lock), so a read leaves no folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{Path.cwd().resolve() / STORE_DIR / DB_FILE}"


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
    """Downloaded registry artifacts, reused between calls (see pipeline.registry.versions)."""
    return store_root() / CACHE_DIR


def configure_tracking() -> str:
    """Point MLflow's tracking, and so its registry, at the store; returns the URI.

    The registry follows the tracking URI unless MLFLOW_REGISTRY_URI names another one. It is
    not set here: mlflow.set_registry_uri is process-global and outranks the tracking URI even
    of an explicit MlflowClient(tracking_uri=...), so a later store would still register into this one.
    """
    import mlflow

    uri = check_store()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep CLI output to log lines
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)  # also exported as MLFLOW_TRACKING_URI for subprocesses
    return uri


# the schemes MLflow's registry stores take (a bare path is a file store)
SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc", "uc")
SQLITE_HEADER = b"SQLite format 3\x00"


def check_store() -> str:
    """The tracking URI, after checking that it (and MLFLOW_REGISTRY_URI) names a store MLflow can
    use, that a server answers and that a sqlite file is a sound database; cheap, imports no MLflow.

    Steps call it before their slow imports and work, so a dead server costs seconds, not minutes.
    """
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        uri = os.environ.get(variable, "").strip()
        check_scheme(uri, variable)
        check_reachable(uri, variable=variable)
    uri = tracking_uri()
    db = sqlite_path(uri)
    if db is not None:
        check_sqlite(db)
    return uri


def check_scheme(uri: str, variable: str) -> None:
    scheme = urlsplit(uri).scheme.split("+")[0].lower()  # postgresql+psycopg2://: the dialect's driver
    if scheme not in SCHEMES and not (len(scheme) == 1 and os.name == "nt"):  # C:\ is a path
        raise StoreUnreachable(
            f"{variable}={uri}: MLflow keeps no store at a {scheme!r} URI; use http(s)://HOST:PORT (a tracking "
            "server), sqlite:///PATH, postgresql://..., mysql://..., or unset it for the embedded store")


def check_sqlite(db: Path) -> None:
    """A store file that is not a sound sqlite database (truncated, overwritten) is named at once:
    MLflow would end in "database disk image is malformed" after its slow imports."""
    if not db.exists():
        return
    import sqlite3

    try:
        with open(db, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
        if db.stat().st_size and header != SQLITE_HEADER:
            raise sqlite3.DatabaseError("file is not a database")
        conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            bad = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        finally:
            conn.close()
        if bad != "ok":
            raise sqlite3.DatabaseError(bad)
    except sqlite3.DatabaseError as exc:
        raise StoreUnreachable(
            f"the MLflow store {db} is damaged ({exc}): restore it from a backup, or move it aside to start "
            "an empty store (MLFLOW_TRACKING_URI can point at another one)") from None
    except OSError as exc:
        raise StoreUnreachable(f"the MLflow store {db} cannot be read ({exc.strerror}): check its permissions") from None


def check_prefect_api() -> None:
    """PREFECT_API_URL, when set, answers (else Prefect waits on it and fails with a RuntimeError)."""
    check_reachable(os.environ.get("PREFECT_API_URL", "").strip(), "Prefect API", "PREFECT_API_URL")


def _answers(parts: SplitResult) -> None:
    """One HTTP request for {uri}/health; any HTTP answer passes (404 included: MLflow's own call names it)."""
    if parts.scheme == "https":  # a liveness probe sends nothing secret: no certificate check here
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=PROBE_TIMEOUT, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=PROBE_TIMEOUT)
    try:
        conn.request("GET", parts.path.rstrip("/") + "/health")
        conn.getresponse().read(0)
    finally:
        conn.close()


def check_reachable(uri: str, what: str = "MLflow store", variable: str = "MLFLOW_TRACKING_URI",
                    delays: tuple[float, ...] = PROBE_DELAYS) -> None:
    """Fail in seconds, not minutes, when an http(s) server refuses, drops or does not answer requests.

    Raises StoreUnreachable naming the URI, the attempts and the time they took. Other URIs pass.
    """
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    started = time.monotonic()
    for attempt in range(len(delays) + 1):
        try:
            _answers(parts)
            return
        except (OSError, http.client.HTTPException) as exc:
            reason = _reason(exc)
        if attempt < len(delays):
            time.sleep(delays[attempt])
    raise StoreUnreachable(
        f"{what} {uri} is unreachable ({reason}; {len(delays) + 1} attempts in "
        f"{time.monotonic() - started:.1f} s): start the server or point {variable} at a running one"
    )


def _reason(exc: Exception) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {PROBE_TIMEOUT:g} s"
    if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError):
        return "it closed the connection without answering"
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or exc.__class__.__name__


def configure_mlflow(experiment: str) -> str:
    """Tracking (and registry) URI and the active experiment, created with our artifact location; its id."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

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
