"""Where a command may write: every OUTPUT is checked here before any work, so that no command
destroys its input, a model directory, the working folder or a folder it did not write.

A file OUTPUT may be new or replace a file; it may not be an input, a directory, or lie inside a
model directory (only `train` writes there, into its own --out). A folder OUTPUT (embedding a
folder of Parquet files) is a new path, an empty folder, or a folder of parts that vaepipe wrote
before; then only those parts are replaced and whatever else it holds stays.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError, output_error
from pipeline.io.tables import PARQUET_SUFFIXES, SUFFIXES
from vae.atomic import dir_mode, file_mode, sweep_stale, temp_prefix, write_atomic
from vae.store import BASELINES, CHECKPOINT, MANIFEST, WEIGHTS

TRAIN_LOCK = ".vaepipe-train.lock"  # in a model directory while `train` writes it
PARTS_MANIFEST = ".vaepipe-parts.json"  # in a folder of parts: which files vaepipe wrote there
PROVENANCE_KEY = b"vaepipe"  # Parquet metadata of an embedding output: model version, input file and hash
MODEL_FILES = (MANIFEST, WEIGHTS, CHECKPOINT, BASELINES)


def model_directory(folder: Path) -> bool:
    """A folder that holds a model's files (a finished model or an interrupted run)."""
    return folder.is_dir() and any((folder / name).exists() for name in MODEL_FILES)


def _check_not_in_model(path: Path, what: str) -> None:
    parent = path.resolve().parent
    if model_directory(parent):
        raise PipelineError(f"{what} {path} lies inside the model directory {parent}; only `vaepipe train` "
                            "writes there: choose a path outside it")


def same_path(a: Path, b: Path) -> bool:
    """One file by two names: the same path once resolved, or links to one file."""
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def check_output(path: Path, inputs: Sequence[Path] = (), suffixes: Sequence[str] | None = SUFFIXES) -> Path:
    """Refuse a file OUTPUT that is an input, a directory, inside a model directory, or (suffixes)
    of a format this command does not write."""
    path = Path(path)
    folder = next((p for p in path.parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise PipelineError(f"OUTPUT {path}: {folder} is a file, not a folder; choose another path")
    for source in inputs:
        if same_path(path, Path(source)):
            raise PipelineError(f"OUTPUT {path} is the input {source}; writing it would destroy the input: choose another path")
    if path.is_dir():
        raise PipelineError(f"OUTPUT {path} is a directory; give a file name")
    _check_not_in_model(path, "OUTPUT")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise PipelineError(
            f"OUTPUT {path}: this command writes {' or '.join(suffixes)} files, not {path.suffix or '(no suffix)'!r}; "
            f"name it e.g. {path.with_suffix(suffixes[0]).name}"
        )
    return path


def check_output_dir(path: Path, inputs: Sequence[Path] = ()) -> Path:
    """Refuse a folder OUTPUT that vaepipe may not fill: see the module's docstring."""
    path = Path(path)
    real, cwd = path.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise PipelineError(f"OUTPUT {path} is the working folder or one of its parents; "
                            "give the path of a new folder for the parts")
    for source in map(Path, inputs):
        inside = source.resolve()
        if real == inside or real in inside.parents:
            raise PipelineError(f"OUTPUT {path} {'is' if real == inside else 'contains'} the input {source}; "
                                "writing it would destroy the input: give the path of a new folder")
    if path.exists() and not path.is_dir():
        raise PipelineError(f"OUTPUT {path} is a file; give the path of a new folder for the parts")
    if model_directory(path):
        raise PipelineError(f"OUTPUT {path} is a model directory; give the path of a new folder for the parts")
    _check_not_in_model(path, "OUTPUT")
    if path.is_dir() and any(path.iterdir()) and own_parts(path) is None:
        raise PipelineError(f"OUTPUT {path} is a folder that vaepipe did not write (it holds "
                            f"{_first_entry(path)!r}); give the path of a new folder, or empty this one yourself")
    return path


def _first_entry(folder: Path) -> str:
    return min(p.name for p in folder.iterdir())


def own_parts(folder: Path) -> list[str] | None:
    """The parts vaepipe wrote in folder (from its PARTS_MANIFEST, or for a folder written before
    there was one, its Parquet files when each carries vaepipe's provenance); None if not vaepipe's."""
    manifest = folder / PARTS_MANIFEST
    if manifest.is_file():
        try:
            parts = json.loads(manifest.read_text())["parts"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return [str(p) for p in parts] if isinstance(parts, list) else None
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if entries and all(p.is_file() and p.suffix.lower() in PARQUET_SUFFIXES and _has_provenance(p) for p in entries):
        return sorted(p.name for p in entries)
    return None


def _has_provenance(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        return PROVENANCE_KEY in (pq.read_schema(path).metadata or {})
    except Exception:  # not Parquet: not a part of ours
        return False


@contextmanager
def parts_dir(path: Path, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """A temporary sibling folder to fill with the parts of OUTPUT (checked by check_output_dir).

    On success a new (or empty) OUTPUT is the filled folder, renamed into place whole; a folder of
    parts vaepipe wrote before gets the new parts, loses its old parts that are not among them,
    and keeps every other file. On failure nothing at OUTPUT changes.
    """
    path = check_output_dir(Path(path), inputs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise output_error(path, exc) from None
    try:
        yield tmp
        tmp.chmod(dir_mode())  # mkdtemp makes 0700: the mode a plain new folder gets under the umask
        parts = sorted(p.name for p in tmp.iterdir())
        write_atomic(tmp / PARTS_MANIFEST, (json.dumps({"written_by": "vaepipe", "parts": parts}) + "\n").encode())
        old = own_parts(path) if path.is_dir() and any(path.iterdir()) else None
        if old is None:
            os.replace(tmp, path)  # a new path, or over an empty folder: the whole folder at once
        else:
            _replace_parts(tmp, path, parts, old)
    except OSError as exc:
        raise output_error(path, exc) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_parts(tmp: Path, folder: Path, parts: list[str], old: list[str]) -> None:
    """Move the new parts into a folder of ours; remove our old parts that are not among them."""
    for name in parts:
        os.replace(tmp / name, folder / name)
    for name in set(old) - set(parts):
        (folder / name).unlink(missing_ok=True)
    os.replace(tmp / PARTS_MANIFEST, folder / PARTS_MANIFEST)


def busy_message(path: Path) -> str | None:
    """Why a `train` may not write into path now: another holds its TRAIN_LOCK (None if none does)."""
    try:
        fd = os.open(path / TRAIN_LOCK, os.O_RDONLY)
    except OSError:  # no lock file: nobody is writing
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted unless a writer holds it exclusively
        return None
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "holder unknown"
        return (f"--out {path} is being written by another `vaepipe train` ({holder}); "
                "wait for it to finish or choose another --out")
    finally:
        os.close(fd)  # and with it the shared lock


@contextmanager
def claimed_dir(path: Path) -> Iterator[bool]:
    """Hold the folder `train` writes for one writer at a time: an exclusive flock on TRAIN_LOCK
    inside it (the kernel drops it when its holder dies, however it dies), taken before anything is
    written, so that a second run into the same --out is refused at once instead of mixing its files
    with the first's. Yields whether the folder was created here; on leaving, the lock file goes,
    and a folder created here that holds nothing else goes too."""
    created = False
    try:
        path.mkdir(parents=True)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise output_error(path, exc) from None
    lock, held = path / TRAIN_LOCK, False
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
    except OSError as exc:
        raise output_error(path, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(busy_message(path) or f"--out {path} is being written by another `vaepipe train`") from None
        held = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}".encode(), 0)
        yield created
    finally:
        if held:
            lock.unlink(missing_ok=True)
            if created and path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        os.close(fd)
