"""Errors the CLI turns into one line on stderr and an exit code (README "Commands": exit codes).

`user_error` is the one place where an error of the user's environment (a full disk, a read-only
file system, a path that is a directory) becomes such a line; anything else left is a bug (exit 3).
"""

from __future__ import annotations

import errno
import os
import re

from vae.errors import VAEError


class PipelineError(Exception):
    """A user or input mistake: missing file, bad table, unknown key, schema mismatch."""

    exit_code = 2


class ValidationFailed(PipelineError):
    """The table failed validation."""

    exit_code = 1


class GateRefused(PipelineError):
    """The promotion gate kept the champion; `promotion` holds the gate's figures where it scored both."""

    exit_code = 1

    def __init__(self, message: str, promotion: object = None) -> None:
        super().__init__(message)
        self.promotion = promotion


class StoreUnreachable(PipelineError):
    """The MLflow tracking or registry server did not answer."""


# what the user can do about each OS error their environment causes
_HINTS = {
    errno.ENOSPC: "free space on that disk or write elsewhere",
    errno.EDQUOT: "free space in your quota or write elsewhere",
    errno.EFBIG: "a limit (ulimit -f) or the file system refuses a file this large",
    errno.EROFS: "choose a writable location",
    errno.EACCES: "check the permissions or choose another location",
    errno.EPERM: "check the permissions or choose another location",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory; give a file name",
    errno.ENOENT: "check the path",
    errno.EEXIST: "choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EMFILE: "raise the open-file limit (ulimit -n)",
}
_TEMPORARY = re.compile(r"\.(.+?)\.(?:vaepipe-\d+-\w+-)?\w{8}\.tmp")  # mkstemp(prefix=".NAME.[vaepipe-PID-HOST-]")
_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)
# MLflow's text when its HTTP retries against a server ran out: "API request to URL failed with exception ..."
_STORE_REFUSED = re.compile(r"API request to (?:endpoint )?(?P<url>\S+) failed with error code (?P<code>\d+)")
_STORE_DOWN = re.compile(r"API request to (?P<url>\S+) failed with exception .*(Max retries exceeded|timed out)", re.DOTALL)
_STORE_SLOW = re.compile(r"API request to (?P<url>\S+) failed with timeout exception")


def os_errno(exc: OSError) -> int | None:
    """The errno, also where pyarrow only writes it into the message ("[errno 28] ...")."""
    if exc.errno is not None:
        return int(exc.errno)
    found = _ERRNO_IN_TEXT.search(str(exc))
    return int(found[1]) if found else None


def os_reason(exc: OSError) -> str:
    """'No space left on device (free space on that disk or write elsewhere)'."""
    code = os_errno(exc)
    text = os.strerror(code) if code is not None else (exc.strerror or str(exc).splitlines()[0])
    hint = _HINTS.get(code) if code is not None else None
    return f"{text} ({hint})" if hint else text


def output_error(path: object, exc: OSError) -> PipelineError:
    """An OS error while writing path, as one line that names path."""
    return PipelineError(f"cannot write {path}: {os_reason(exc)}; nothing was written there")


def _final_name(filename: object) -> str:
    """The file a write was for: '.m.json.ab12cd34.tmp' (an atomic write's temporary) -> 'm.json'."""
    text = os.fsdecode(filename) if isinstance(filename, str | bytes) else str(filename)
    head, _, base = text.rpartition(os.sep)
    found = _TEMPORARY.fullmatch(base)
    return f"{head}{os.sep if head else ''}{found[1]}" if found else text


def _prefect_api_error(text: str) -> PipelineError | None:
    """Prefect's RuntimeErrors when its API is down or its local server did not start."""
    unreached = re.search(r"Failed to reach API at (\S+)", text)
    if unreached is not None:
        return StoreUnreachable(f"the Prefect API {unreached[1].rstrip('.')} does not answer: start it (`prefect server start`) "
                                "or unset PREFECT_API_URL to run on a local one")
    if "Timed out while attempting to connect to ephemeral Prefect API server" in text:
        crashed = re.search(r"exited with code (-?\d+)", text)
        why = (f"exited with code {crashed[1]} (check the install: `prefect server start` shows why)" if crashed
               else "did not start in time (a busy machine: raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, "
               f"now {os.environ.get('PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS', '20')})")
        return StoreUnreachable(f"Prefect's local API server {why}, or point PREFECT_API_URL at a running server")
    return None


def user_error(exc: BaseException) -> PipelineError | None:
    """exc as a one-line user/environment error, or None when it is a bug."""
    if isinstance(exc, PipelineError):
        return exc
    if isinstance(exc, VAEError):  # the torch library's own user errors (bad config, model directory)
        return PipelineError(str(exc))
    if isinstance(exc, MemoryError):  # a size the user asked for that this machine cannot hold
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "an allocation failed"
        return PipelineError(f"not enough memory: {detail}; ask for fewer rows or columns, or use a larger machine")
    if isinstance(exc, OSError) and os_errno(exc) in _HINTS:
        where = _final_name(exc.filename) if exc.filename is not None else "a file"
        return PipelineError(f"{where}: {os_reason(exc)}")
    if isinstance(exc, RuntimeError):
        return _prefect_api_error(str(exc))
    if type(exc).__name__ != "MlflowException":
        return None
    refused = _STORE_REFUSED.search(str(exc))
    if refused is not None:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "the tracking URI")
        return StoreUnreachable(
            f"the MLflow store {uri} answered HTTP {refused['code']} to {refused['url']}: "
            "check that MLFLOW_TRACKING_URI points at a running MLflow server"
        )
    slow = _STORE_SLOW.search(str(exc))
    if slow is not None:  # a server that took the request and did not answer in time
        timeout = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
        return StoreUnreachable(
            f"the MLflow store did not answer {slow['url']} within {timeout} s (MLFLOW_HTTP_REQUEST_TIMEOUT): "
            "check the server, then rerun"
        )
    down = _STORE_DOWN.search(str(exc))
    if down is not None:
        retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "?")
        return StoreUnreachable(
            f"the MLflow store stopped answering ({down['url']}, {down[2]} after {retries} retries): "
            "check the server, then rerun"
        )
    return None
