"""data.source: sklearn:NAME, synthetic:ROWSxCOLS, a Parquet/CSV table, or a folder (its newest table)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.io.tables import SUFFIXES, read_table

SKLEARN_SOURCES = ("breast_cancer", "diabetes", "wine")
_SYNTHETIC = re.compile(r"synthetic:(\d+)x(\d+)")


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

