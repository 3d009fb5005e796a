"""One promotion of a registered model at a time, across processes and machines.

The gate reads @champion, evaluates both versions and moves the alias; two promotions that
interleave could both pass against the same champion. `promotion_lock` is held across all of it:

- embedded sqlite store (the default): an flock on `<store>/.promote-NAME.lock`, beside the
  database; every process that can open the store can take it, and the kernel drops it when its
  holder dies, however it dies.
- any other tracking URI (a remote MLflow server): the registry itself is the lock. Creating a
  registered model is atomic on the server (its name is a primary key), so exactly one process
  creates `NAME.promotion-lock`; it deletes it when done. A holder killed outright leaves it
  behind: it is broken after LOCK_STALE_S, or by hand with `MlflowClient().delete_registered_model`.
  VAEPIPE_LOCK_DIR, a folder on a file system every promoting host shares, selects the flock instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from pipeline import stores
from pipeline.errors import PipelineError

LOCK_TIMEOUT_S = 900.0  # longest wait for another promotion (it evaluates two models)
LOCK_STALE_S = 3600.0  # a registry lock older than this was left by a dead holder
POLL_S = 0.5


def _holder() -> str:
    return f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%H:%M:%S', time.gmtime())} UTC"


def _waiting(name: str, holder: str) -> None:
    print(f"vaepipe: waiting for another promotion of {name} ({holder or 'holder unknown'}) to finish",
          file=sys.stderr, flush=True)


@contextlib.contextmanager
def promotion_lock(name: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Held across reading @champion, the evaluation and the alias move; PipelineError after timeout."""
    lock_dir = os.environ.get("VAEPIPE_LOCK_DIR", "").strip()
    db = stores.sqlite_path(stores.tracking_uri())
    if lock_dir or db is not None:
        folder = Path(lock_dir) if lock_dir else db.parent  # type: ignore[union-attr]
        with _file_lock(folder / f".promote-{_safe(name)}.lock", name, timeout):
            yield
    else:
        with _registry_lock(name, timeout):
            yield


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


@contextlib.contextmanager
def _file_lock(path: Path, name: str, timeout: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _wait(lambda: _try_flock(fd), lambda: _read_holder(path), name, timeout)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder().encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_holder(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text().strip()
    return ""


def _wait(acquire: Callable[[], bool], holder: Callable[[], str], name: str, timeout: float) -> None:
    deadline, told = time.monotonic() + timeout, False
    while not acquire():
        if time.monotonic() > deadline:
            raise PipelineError(f"another promotion of {name} ({holder() or 'holder unknown'}) held the "
                                f"promotion lock for more than {timeout:.0f} s; retry when it is done")
        if not told:
            _waiting(name, holder())
            told = True
        time.sleep(POLL_S)


@contextlib.contextmanager
def _registry_lock(name: str, timeout: float) -> Iterator[None]:
    client, lock = MlflowClient(), f"{name}.promotion-lock"
    _wait(lambda: _try_create(client, lock), lambda: _registry_holder(client, lock), name, timeout)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _try_create(client: MlflowClient, lock: str) -> bool:
    try:
        client.create_registered_model(lock, tags={"holder": _holder(), "since": str(time.time())},
                                       description="vaepipe promotion lock; delete it if no promotion runs")
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        _break_if_stale(client, lock)
        return False
    return True


def _break_if_stale(client: MlflowClient, lock: str) -> None:
    with contextlib.suppress(MlflowException, ValueError):
        since = float(client.get_registered_model(lock).tags.get("since", "inf"))
        if time.time() - since > LOCK_STALE_S:
            client.delete_registered_model(lock)


def _registry_holder(client: MlflowClient, lock: str) -> str:
    with contextlib.suppress(MlflowException):
        return str(client.get_registered_model(lock).tags.get("holder", ""))
    return ""
