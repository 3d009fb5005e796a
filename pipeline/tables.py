"""Reading and writing tables: Parquet or CSV in, numeric features out, nothing partial on disk."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import queue
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch

from pipeline.errors import PipelineError, output_error
from vae import VAEError
from vae.atomic import atomic_file

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)
SUFFIXES = PARQUET_SUFFIXES + CSV_SUFFIXES
SKLEARN_SOURCES = ("breast_cancer", "diabetes", "wine")
_SYNTHETIC = re.compile(r"synthetic:(\d+)x(\d+)")
_T = TypeVar("_T")
STREAM_BUFFER_BYTES = 1 << 20  # read buffer of a streamed Parquet column
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
_HEAP_BOUNDED = False


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise PipelineError(
            f"{path}: unsupported table format {suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(SUFFIXES)}"
        )
    return "Parquet" if suffix in PARQUET_SUFFIXES else "CSV"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else exc.__class__.__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _guarded(path: Path, kind: str, work: Callable[[], _T]) -> _T:
    """Run a read, turning whatever the reader raises into one line that names the file."""
    try:
        return work()
    except PipelineError:
        raise
    except MemoryError:
        raise
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start:exc.start + 1].hex()
        raise PipelineError(f"{path} is not a readable {kind} table: not UTF-8 text (byte 0x{byte}); "
                            "if it is text, save it as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    except Exception as exc:  # pyarrow and pandas raise many unrelated types on bad bytes
        raise PipelineError(f"{path} is not a readable {kind} table: {_reason(exc)}") from None


def _check_file(path: Path) -> str:
    kind = _kind(path)
    if not path.exists():
        raise PipelineError(f"{path} does not exist")
    if not path.is_file():
        raise PipelineError(f"{path} is not a file; expected a {kind} table")
    return kind


def _check_unique(path: Path, names: Sequence[str]) -> None:
    """Every column named, each name once."""
    empty = [i for i, n in enumerate(names) if not str(n).strip()]
    if empty:
        index = " (a table saved with its index: save it with index=False)" if empty == [0] else ""
        raise PipelineError(f"{path}: column {empty[0] + 1} of {len(names)} has an empty name{index}; "
                            "name every column or drop the unnamed one")
    seen: set[str] = set()
    twice = [n for n in names if n in seen or seen.add(n)]  # type: ignore[func-returns-value]
    if twice:
        raise PipelineError(
            f"{path}: column {twice[0]!r} appears more than once in the header; rename or drop the copies"
        )


@dataclass(frozen=True)
class CsvDialect:
    names: list[str]  # the header as written
    sep: str = ","
    decimal: str = "."


_SEPARATORS = (",", ";", "\t", "|")
_DECIMAL_COMMA = re.compile(r"-?\d+,\d+")


def _csv_dialect(path: Path) -> CsvDialect:
    """The header as written and the delimiter: a comma, or the one other delimiter (; tab |) that
    splits the header and the first row into as many fields (with decimal commas under ';').
    pandas would rename a repeated 'a' to 'a.1' and hide it, and would read rows with one field
    more than the header as an index column, shifting every column: both are refused here."""
    import csv

    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        head, line = f.readline(), f.readline()
    fits = [s for s in _SEPARATORS if head.count(s) and head.count(s) <= line.count(s)] if line else []
    sep = "," if "," in fits or len(fits) != 1 else fits[0]
    if sep == "," and "," not in head and fits:
        raise PipelineError(f"{path} looks delimited by {' or '.join(map(repr, fits))}, not by commas; "
                            "save it with commas between fields")
    names = next(csv.reader([head], delimiter=sep), [])
    first = next(csv.reader([line], delimiter=sep), None) if line.strip() else None
    _check_unique(path, names)
    if first is not None and len(first) > len(names):
        raise PipelineError(f"{path}: row 1 has {len(first)} fields but the header names {len(names)} columns; "
                            "every row needs one field per header name (a trailing delimiter, or a missing header name?)")
    decimal = "," if sep == ";" and first and any(_DECIMAL_COMMA.fullmatch(v.strip()) for v in first) else "."
    return CsvDialect(names, sep, decimal)


def _check_columns(path: Path, available: Sequence[str], columns: Sequence[str] | None) -> None:
    missing = [c for c in columns or () if c not in available]
    if missing:
        raise PipelineError(f"{path}: missing columns {', '.join(map(repr, missing))}")


def _check_not_empty(path: Path, df: pd.DataFrame) -> pd.DataFrame:
    if df.shape[1] == 0:
        raise PipelineError(f"{path} has no columns; expected a table with a header row")
    if df.shape[0] == 0:
        raise PipelineError(f"{path} has no rows")
    return df


def _read_parquet(path: Path, columns: Sequence[str] | None) -> pd.DataFrame:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    _check_unique(path, pf.schema_arrow.names)
    _check_columns(path, pf.schema_arrow.names, columns)
    return pf.read(columns=list(columns) if columns else None).to_pandas()


def _read_csv(path: Path, columns: Sequence[str] | None) -> pd.DataFrame:
    _check_csv_size(path)
    d = _csv_dialect(path)
    header = pd.read_csv(path, nrows=0, sep=d.sep)
    _check_columns(path, list(header.columns), columns)
    df = pd.read_csv(path, usecols=list(columns) if columns else None, sep=d.sep, decimal=d.decimal)
    return df[list(columns)] if columns else df  # usecols keeps the file's order


def _check_csv_size(path: Path) -> None:
    if path.stat().st_size == 0:
        raise PipelineError(f"{path} is empty; expected a CSV table with a header row")


def read_table(path: Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A whole Parquet (.parquet, .pq) or CSV (.csv) table; one-line PipelineError otherwise."""
    path = Path(path)
    kind = _check_file(path)
    reader = _read_parquet if kind == "Parquet" else _read_csv
    df = _guarded(path, kind, lambda: reader(path, columns))
    return _check_not_empty(path, df)


def table_shape(path: Path) -> tuple[int, int]:
    """(rows, columns) without reading the cells: Parquet's metadata, a CSV's header and line count
    (an upper bound on its rows where quoted cells hold line breaks)."""
    path = Path(path)
    kind = _check_file(path)
    if kind == "Parquet":
        import pyarrow.parquet as pq

        meta = _guarded(path, kind, lambda: pq.ParquetFile(path).metadata)
        return meta.num_rows, meta.num_columns
    _check_csv_size(path)
    columns = len(_guarded(path, kind, lambda: _csv_dialect(path)).names)
    with open(path, "rb") as f:
        lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    return max(lines - 1, 0), columns


def bound_heap_growth() -> None:
    """Serve allocations of 1 MiB and more from mmap, returned to the system when freed.

    glibc raises its mmap threshold after each large free (up to 32 MiB), so the per-batch
    tensors of a long stream then land on the heap, which fragments and grows: measured 2 GiB
    after a few 65536-row batches with scores, 0.75 GiB with this. Process-wide; a no-op off glibc.
    """
    global _HEAP_BOUNDED
    if _HEAP_BOUNDED or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    _HEAP_BOUNDED = True


def iter_table_batches(
    path: Path, batch_rows: int, columns: Sequence[str] | None = None
) -> Iterator[pd.DataFrame]:
    """Stream a table in frames of at most batch_rows rows: memory stays bounded.

    The file is opened and its header checked here, before the first batch is asked for.
    """
    path = Path(path)
    if batch_rows < 1:
        raise PipelineError(f"batch_rows is {batch_rows}; it must be >= 1")
    kind = _check_file(path)
    opener = _parquet_batches if kind == "Parquet" else _csv_batches
    batches = _guarded(path, kind, lambda: opener(path, batch_rows, columns))
    return _stream(path, kind, batches)


def prefetch(items: Iterator[_T], depth: int = 2) -> Iterator[_T]:
    """The items of an iterator, read ahead by a thread (Parquet decoding releases the GIL);
    at most depth items wait in memory; an error of the reader is raised here, in order."""
    ready: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(item: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, end))
        except BaseException as exc:  # handed to the consumer, raised there
            put((False, exc))

    reader = threading.Thread(target=read, name="prefetch", daemon=True)
    reader.start()
    try:
        while True:
            ok, item = ready.get()
            if not ok:
                raise item
            if item is end:
                return
            yield item
    finally:
        stop.set()
        reader.join()


def _stream(path: Path, kind: str, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    seen = 0
    while (batch := _guarded(path, kind, lambda: next(batches, None))) is not None:
        seen += len(batch)
        yield batch
    if seen == 0:
        raise PipelineError(f"{path} has no rows")


def _parquet_batches(
    path: Path, batch_rows: int, columns: Sequence[str] | None
) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    # pre_buffer (pyarrow's default) caches every column chunk it fetched until the file is closed:
    # memory then grows with the file. Streamed reads keep about one row group decoded at a time.
    pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=STREAM_BUFFER_BYTES)
    _check_unique(path, pf.schema_arrow.names)
    _check_columns(path, pf.schema_arrow.names, columns)
    cols = list(columns) if columns else None
    return (b.to_pandas() for b in pf.iter_batches(batch_size=batch_rows, columns=cols))


def _csv_batches(
    path: Path, batch_rows: int, columns: Sequence[str] | None
) -> Iterator[pd.DataFrame]:
    _check_csv_size(path)
    d = _csv_dialect(path)
    header = pd.read_csv(path, nrows=0, sep=d.sep)
    _check_columns(path, list(header.columns), columns)
    cols = list(columns) if columns else None
    chunks = pd.read_csv(path, chunksize=batch_rows, usecols=cols, sep=d.sep, decimal=d.decimal)
    return (chunk[cols] if cols else chunk for chunk in chunks)  # usecols keeps the file's order


def newest_table(folder: Path) -> Path:
    """The most recently modified Parquet/CSV file of a folder (ties: the last name)."""
    tables = [p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES]
    if not tables:
        raise PipelineError(
            f"data.source {str(folder)!r} is a folder without any table ({', '.join(SUFFIXES)}); "
            "put the new table there or point data.source at a file"
        )
    return max(tables, key=lambda p: (p.stat().st_mtime_ns, p.name))


def resolve_source(source: str) -> str:
    """data.source with a folder replaced by its newest table (scheduled retraining drops tables there)."""
    if source.startswith(("sklearn:", "synthetic:")) or not Path(source).is_dir():
        return source
    return str(newest_table(Path(source)))


def load_source(source: str, seed: int = 0) -> pd.DataFrame:
    """data.source: sklearn:NAME, synthetic:ROWSxCOLS, a Parquet/CSV table, or a folder (its newest table)."""
    source = resolve_source(source)
    if source.startswith("sklearn:"):
        return _load_sklearn(source)
    if source.startswith("synthetic:"):
        match = _SYNTHETIC.fullmatch(source.strip())
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            raise PipelineError(
                f"data.source {source!r}: expected synthetic:ROWSxCOLS with positive integers, "
                "e.g. synthetic:2000x10"
            )
        rows, cols = int(match[1]), int(match[2])
        check_memory(rows * (cols + 2) * 8 * 4, f"data.source {source!r}")  # t, y, noise and the frame: float64
        return synthetic_table(rows, cols, seed)
    return read_table(Path(source))


def check_memory(need: int, what: str) -> None:
    """Refuse work whose arrays (need bytes) exceed this machine's physical memory."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None
    if total is not None and need > total:
        raise PipelineError(f"{what} needs about {need / 2**30:,.0f} GiB of memory, more than this machine's "
                            f"{total / 2**30:,.0f} GiB; ask for fewer rows or columns")


def _load_sklearn(source: str) -> pd.DataFrame:
    name = source.removeprefix("sklearn:")
    if name not in SKLEARN_SOURCES:
        raise PipelineError(
            f"data.source {source!r}: unknown sklearn data set {name!r}; "
            f"choose one of {', '.join('sklearn:' + n for n in SKLEARN_SOURCES)}"
        )
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")(as_frame=True)
    return bunch.data.astype("float64").reset_index(drop=True)  # features only, no target


def synthetic_table(rows: int, cols: int, seed: int = 0, latent_dim: int = 2) -> pd.DataFrame:
    """Rows of y = f(t) + noise with t ~ N(0, I_2) and smooth nonlinear f.

    f is fixed for a given cols (its weights come from a constant seed), so seed only
    changes the draws of t and the noise: one data-generating process, many samples.
    """
    w = np.random.default_rng([20240, cols])
    lin = w.normal(0.0, 1.0, (latent_dim, cols))  # (L, C)
    freq = w.normal(0.0, 1.0, (latent_dim, cols))
    phase = w.uniform(0.0, 2 * np.pi, cols)
    unit = w.normal(0.0, 1.0, (latent_dim, cols))
    unit /= np.linalg.norm(unit, axis=0)  # projections of t with unit variance
    coef = w.normal(0.0, 1.0, (3, cols))  # weights of the sine, product and square terms
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(rows, latent_dim))  # (N, L)
    prod = t[:, :1] * t[:, 1:2] if latent_dim > 1 else t[:, :1]
    y = (
        t @ lin
        + coef[0] * np.sin(t @ freq + phase)
        + coef[1] * prod
        + 0.5 * coef[2] * (t @ unit) ** 2
    )
    y = y + 0.1 * rng.normal(size=y.shape)
    frame = pd.DataFrame(y, columns=[f"x{j}" for j in range(cols)])
    frame.insert(0, "row_id", np.arange(rows, dtype=np.int64))
    return frame


def is_numeric_dtype(dtype: Any) -> bool:
    if pd.api.types.is_bool_dtype(dtype):
        return True
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype)


def is_text_dtype(dtype: Any) -> bool:
    """Text or categorical columns (object, str, category): modelled over their levels."""
    return (isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(dtype)
            or pd.api.types.is_object_dtype(dtype))


def split_features(
    df: pd.DataFrame, id_columns: Sequence[str], where: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ids, features): id columns pass through; every other column must be numeric or text
    (a text or categorical column is modelled over its levels)."""
    missing = [c for c in id_columns if c not in df.columns]
    if missing:
        raise PipelineError(
            f"{where}: missing id column {', '.join(map(repr, missing))} (data.id_columns); "
            f"the table has {', '.join(map(repr, map(str, df.columns[:8])))}"
            + (", ..." if df.shape[1] > 8 else "")
        )
    ids = df[list(id_columns)]
    features = df[[c for c in df.columns if c not in set(id_columns)]]
    if features.shape[1] == 0:
        raise PipelineError(f"{where}: no feature columns besides the id columns (data.id_columns)")
    bad = [(c, str(t)) for c, t in features.dtypes.items() if not is_numeric_dtype(t) and not is_text_dtype(t)]
    if bad:
        named = ", ".join(f"{c!r} ({t})" for c, t in bad)
        raise PipelineError(
            f"{where}: column {named} is neither numeric nor text; "
            "convert it, drop it (data.drop_columns) or list it in data.id_columns"
        )
    bools = [c for c, t in features.dtypes.items() if pd.api.types.is_bool_dtype(t)]
    if bools:
        # numpy bool has no missing cells; nullable "boolean" may, so it goes to float with NaN
        features = features.astype(
            {c: "int64" if features[c].dtype == np.bool_ else "float64" for c in bools}
        )
    return ids, features


FLOAT32_MAX = float(np.finfo(np.float32).max)


def float32_overflow(features: pd.DataFrame) -> tuple[str, int, float] | None:
    """(column, row, value) of the first finite cell beyond float32's range, which would become inf."""
    for name in features.columns:
        if features[name].dtype.kind != "f" or features[name].dtype.itemsize <= 4:
            continue
        values = features[name].to_numpy(dtype=np.float64, na_value=np.nan)
        big = np.isfinite(values) & (np.abs(values) > FLOAT32_MAX)
        if big.any():
            row = int(np.flatnonzero(big)[0])
            return str(name), row, float(values[row])
    return None


def float32_collapsed(features: pd.DataFrame) -> list[tuple[str, str]]:
    """(column, why) for each integer column whose distinct values all round to one float32 (int64
    ids or timestamps near 2**62): the model, which computes in float32, would see a constant column."""
    lines = []
    for name in features.columns:
        values = features[name].to_numpy()
        if values.dtype.kind not in "iu" or len(values) == 0:
            continue
        lo, hi = values.min(), values.max()
        if lo != hi and np.float32(lo) == np.float32(hi):  # rounding is monotone: everything between too
            lines.append((str(name), f"holds integers near {float(hi):.3g} that differ by at most "
                          f"{int(hi) - int(lo):,}: float32, in which the model computes, cannot tell them "
                          "apart; subtract an offset (e.g. the column's minimum) or drop the column"))
    return lines


def to_tensor(features: pd.DataFrame, where: str = "table") -> torch.Tensor:
    """(rows, features) float32, a copy: pandas 3 hands out read-only views."""
    over = float32_overflow(features)
    if over is not None:
        name, row, value = over
        raise PipelineError(
            f"{where}: column {name!r} row {row} holds {value:g}, beyond float32's range "
            f"(+-{FLOAT32_MAX:.3g}) in which the model computes; rescale the column (e.g. other units)"
        )
    return torch.from_numpy(features.to_numpy(dtype=np.float32, na_value=np.nan, copy=True))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling to write; renamed over path if the block succeeds, removed otherwise
    (vae.atomic.atomic_file: a writer killed outright leaves a temporary the next writer of path
    on this host removes). An OS error of the file system (full disk, read-only, permissions)
    becomes a PipelineError naming path."""
    try:
        with atomic_file(path) as tmp:
            yield tmp
    except (PipelineError, VAEError):
        raise
    except OSError as exc:
        raise output_error(path, exc) from None


def write_table_atomic(df: pd.DataFrame, path: Path) -> Path:
    """Write Parquet (or CSV by suffix) so that path holds the old file or the whole new one."""
    path = Path(path)
    kind = _kind(path)
    with atomic_path(path) as tmp:
        if kind == "Parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
        else:
            df.to_csv(tmp, index=False)
    return path
