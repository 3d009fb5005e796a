"""The sample stage: synthetic rows drawn from p(z) p(y|z), streamed to Parquet or CSV."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import Params
from pipeline.contract.model import LoadedModel
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.io.outputs import check_output
from pipeline.io.tables import PARQUET_SUFFIXES
from pipeline.registry.resolve import resolve_model
from vae import sample

SAMPLE_BATCH_ROWS = 65_536  # rows drawn and written at a time by sample_file (a multiple of vae.sample's 4096)


def sample_file(model: LoadedModel, n: int, output_path: Path, seed: int = 0,
                on_batch: Callable[[int], None] | None = None) -> int:
    """N synthetic rows from p(z) p(y|z), feature columns in the schema's order and dtypes,
    streamed to OUTPUT in SAMPLE_BATCH_ROWS row batches (memory does not grow with N); the file
    appears whole or not at all. N whose file cannot fit on OUTPUT's disk is refused up front."""
    if n < 1:
        raise PipelineError(f"N is {n}; ask for at least one row")
    output_path = Path(output_path)
    check_room(output_path, n, len(model.schema.features))
    generator = torch.Generator().manual_seed(seed)  # one stream over the batches: the same rows as one call
    with atomic_path(output_path) as tmp:
        writer: pq.ParquetWriter | None = None
        try:
            for done in range(0, n, SAMPLE_BATCH_ROWS):
                frame = _sample_frame(model, min(SAMPLE_BATCH_ROWS, n - done), generator)
                if output_path.suffix.lower() in PARQUET_SUFFIXES:
                    table = pa.Table.from_pandas(frame, preserve_index=False)
                    writer = writer or pq.ParquetWriter(tmp, table.schema)
                    writer.write_table(table)
                else:
                    frame.to_csv(tmp, index=False, mode="a" if done else "w", header=not done)
                if on_batch is not None:
                    on_batch(done + len(frame))
        finally:
            if writer is not None:
                writer.close()
    return n


def _sample_frame(model: LoadedModel, rows: int, generator: torch.Generator) -> pd.DataFrame:
    y = sample(model.vae, rows, generator=generator, on_grid=True)  # grid columns drawn on their grid
    df = pd.DataFrame(y.numpy(), columns=list(model.schema.features))
    for j, (name, dtype) in enumerate(zip(model.schema.features, model.schema.dtypes, strict=True)):
        levels = model.schema.levels_of(j)
        if levels:  # the drawn codes as their levels
            names = np.asarray(levels, dtype=object)[df[name].to_numpy().astype(np.int64)]
            df[name] = pd.Categorical(names, categories=list(levels)) if dtype == "category" else pd.array(names, dtype="str")
        elif dtype.startswith(("int", "uint", "bool", "Int", "UInt")):
            df[name] = df[name].round().astype(dtype)
    return df


def check_room(path: Path, rows: int, columns: int) -> None:
    """Refuse a table that would not fit on path's disk (8 bytes a Parquet cell, 24 a CSV one)."""
    need = rows * columns * (8 if path.suffix.lower() in PARQUET_SUFFIXES else 24)
    folder = next(p for p in (path.parent, *path.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if need > free:
        raise PipelineError(f"{rows:,} rows x {columns} columns need about {_size(need)} at {path}, more than the "
                            f"{_size(free)} free on that disk; ask for fewer rows or write elsewhere")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def run(model: str, n: int, output: Path, params: Params, on_batch: Callable[[int], None] | None = None) -> int:
    """`vaepipe sample`: N rows of MODEL's p(y) into OUTPUT (embed.seed)."""
    check_output(Path(output))
    return sample_file(resolve_model(model), n, Path(output), params.embed.seed, on_batch)
