"""Small tables and fast params shared by the pipeline tests."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main

FAST = [
    "train.epochs=15", "train.batch_size=64", "train.kl_warmup_steps=0", "train.num_threads=1",
    "model.hidden_dims=[16]", "model.latent_dim=2", "evaluate.iw_samples=20", "embed.score_samples=10",
]
IDS = ["--set", "data.id_columns=[sample_id]"]  # clean_table's id column
FAST_ARGS = [a for s in FAST for a in ("--set", s)] + IDS  # FAST as CLI arguments


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class LogRecords(logging.Handler):
    """Every record a logger it is added to handles (for a fixture wider than caplog's test)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def clean_table(n: int = 300, d: int = 5, seed: int = 0) -> pd.DataFrame:
    """i.i.d. rows with a 2-D latent structure, an id column first."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    w = rng.normal(size=(2, d))
    x = np.tanh(z) @ w + 0.3 * rng.normal(size=(n, d))
    df = pd.DataFrame(x, columns=[f"m{j}" for j in range(d)])
    df.insert(0, "sample_id", np.arange(n))
    return df


@functools.cache
def _empty_store() -> Path:
    """An empty MLflow sqlite store that MLflow created and migrated, once a process."""
    from mlflow import MlflowClient

    db = Path(tempfile.mkdtemp(prefix="vaepipe-empty-store-")) / "mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(db.parent)  # the Default experiment's artifacts: beside it, not in the cwd
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()  # creates and migrates it
    return db


def new_store(root: Path) -> str:
    """The URI of a new, empty MLflow sqlite store, ROOT/mlflow.db: a copy of _empty_store (its
    schema migrations cost seconds a store; the copy is that same empty store)."""
    shutil.copyfile(_empty_store(), root / "mlflow.db")
    return f"sqlite:///{root / 'mlflow.db'}"


@contextlib.contextmanager
def own_store(root: Path) -> Iterator[Path]:
    """A module's own MLflow sqlite store in ROOT (new_store), with ROOT as the working folder;
    afterwards the session's store again (mlflow keeps the tracking URI in a global as well as the variable)."""
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", new_store(root))
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)  # the registry follows the tracking URI
        yield root
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
