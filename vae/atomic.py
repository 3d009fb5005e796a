"""Atomic writes whose temporaries a later writer can clean up after a kill (standard library only).

A temporary of PATH is named `.NAME.vaepipe-PID-HOST-XXXXXXXX.tmp` beside it. A writer that
dies outright (SIGKILL, SIGTERM without a handler, power loss) cannot remove its temporary;
the next writer of the same path on the same host sees that PID is gone and removes it
(sweep_stale), so an interrupted run leaves nothing to clean by hand.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # no dots or dashes in a name


def current_umask() -> int:
    """The process's umask (read from procfs where it can be, so no thread sees it changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode open(2) would give a new file: 0666 less the umask (0644 under the usual 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode mkdir(2) would give a new folder: 0777 less the umask."""
    return 0o777 & ~current_umask()


def temp_prefix(path: Path) -> str:
    """.NAME.vaepipe-PID-HOST-: the prefix of this process's temporaries of path."""
    return f".{Path(path).name}.vaepipe-{os.getpid()}-{HOST}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    try:  # a zombie (killed, not yet reaped: a container's PID 1 may never reap) wrote nothing more
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (macOS) or gone meanwhile
        return True
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def sweep_stale(path: Path) -> list[Path]:
    """Remove temporaries of path left by writers on this host that died; returns them."""
    path = Path(path)
    removed = []
    for entry in path.parent.glob(f".{glob.escape(path.name)}.vaepipe-*.tmp"):
        fields = entry.name[len(path.name) + 10 :].split("-")  # PID, HOST, random.tmp
        if len(fields) < 3 or not fields[0].isdigit() or fields[1] != HOST or _alive(int(fields[0])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary sibling of path to write; renamed over path (the umask's mode) if the block succeeds,
    removed otherwise. A dead writer's temporaries of path are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(file_mode())  # mkstemp makes 0600: the mode a plain new file gets under the umask
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    try:
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        temporary = exc.filename is None or Path(os.fsdecode(exc.filename)).name.startswith(f".{path.name}.vaepipe-")
        if exc.errno is not None and temporary:
            exc.filename = str(path)  # a full disk or read-only folder: name the file meant, not the temporary
        raise
