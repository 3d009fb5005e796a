"""The prepare stage: load data.source and split its rows into train, val and test tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import DataParams, Params
from pipeline.errors import PipelineError
from pipeline.io.outputs import check_output
from pipeline.io.sources import load_source, resolve_source
from pipeline.io.tables import write_table_atomic
from vae.train import capped_rows

SPLITS = ("train", "val", "test")


def split_rows(
    n_rows: int, test_fraction: float, val_fraction: float, seed: int, val_max_rows: int = 0
) -> dict[str, np.ndarray]:
    """Row positions per split, drawn at random but each kept in the table's own order.

    Keeping the order lets the i.i.d. checks of validate still see a trend along the rows.
    val_max_rows: at most this many validation rows (train.val_max_rows; 0: no limit).
    """
    perm = np.random.default_rng(seed).permutation(n_rows)
    n_test = int(np.rint(n_rows * test_fraction))
    n_val = capped_rows(n_rows - n_test, val_fraction, val_max_rows)  # fit()'s own cap
    parts = {
        "test": perm[:n_test],
        "val": perm[n_test : n_test + n_val],
        "train": perm[n_test + n_val :],
    }
    keys = {
        "test": "data.test_fraction",
        "val": "train.val_fraction",
        "train": "data.test_fraction and train.val_fraction",
    }
    for name, rows in parts.items():
        if rows.size == 0:
            raise PipelineError(
                f"prepare: the {name} split of {n_rows} rows would be empty "
                f"(data.test_fraction={test_fraction}, train.val_fraction={val_fraction}); "
                f"change {keys[name]} or use a larger table"
            )
    return {name: np.sort(parts[name]) for name in SPLITS}


def check_tracked(source: str, tables: Path) -> None:
    """A file or folder data.source must lie inside TABLES, the folder a DVC stage depends on:
    elsewhere DVC would not see the table change (sklearn:/synthetic: sources are their params)."""
    if source.startswith(("sklearn:", "synthetic:")):
        return
    path, root = Path(source).resolve(), Path(tables).resolve()
    if path == root or root in path.parents:
        return
    name = Path(source).name
    raise PipelineError(
        f"data.source {source} is outside {tables}, the folder the DVC stage depends on: DVC would not see "
        f"the table change. Move it there and point data.source at it (mv {source} {tables}/ and set "
        f"data.source: {Path(tables) / name}), then version it with `dvc add {Path(tables) / name}`")


def prepare(data: DataParams, val_fraction: float, out_dir: Path, tables: Path | None = None,
            val_max_rows: int = 0) -> dict[str, Path]:
    """Write out_dir/{train,val,test}.parquet; the same params give byte-identical files.

    A split that would overwrite the source table itself is refused before it is read; with
    tables (the DVC stage's dependency), so is a file source outside that folder."""
    out_dir = Path(out_dir)
    if tables is not None:
        check_tracked(data.source, tables)
    source = resolve_source(data.source)
    sources = [] if source.startswith(("sklearn:", "synthetic:")) else [Path(source)]
    for name in SPLITS:
        check_output(out_dir / f"{name}.parquet", sources)
    df = load_source(source, seed=data.seed)
    rows = split_rows(len(df), data.test_fraction, val_fraction, data.seed, val_max_rows)
    paths = {}
    for name in SPLITS:
        part = df.iloc[rows[name]].reset_index(drop=True)
        paths[name] = write_table_atomic(pd.DataFrame(part), out_dir / f"{name}.parquet")
    return paths


def run(params: Params, tables: Path | None = None) -> dict[str, Path]:
    """`vaepipe prepare`: the splits of data.source in data.prepared_dir (prepare)."""
    return prepare(params.data, params.train.val_fraction, Path(params.data.prepared_dir), tables,
                   params.train.val_max_rows)
