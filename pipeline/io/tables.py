"""Reading and writing tables: Parquet or CSV, whole or streamed in row batches; a bad file is
one line that names it. Written tables appear whole (pipeline.io.atomic)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pandas as pd

from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)
SUFFIXES = PARQUET_SUFFIXES + CSV_SUFFIXES
_T = TypeVar("_T")
STREAM_BUFFER_BYTES = 1 << 20  # read buffer of a streamed Parquet column


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
