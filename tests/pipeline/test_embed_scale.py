"""Embedding a folder of Parquet files in this process and over a local Dask cluster; kills mid-stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_params
from pipeline.io.hashing import file_sha256
from pipeline.io.outputs import PARTS_MANIFEST, own_parts
from pipeline.io.sources import synthetic_table
from pipeline.io.tables import write_table_atomic
from pipeline.stages import embed
from pipeline.stages.embed import read_provenance
from pipeline.stages.train import train_model

SETTINGS = ["data.id_columns=[row_id]", "model.latent_dim=2", "model.hidden_dims=[16]", "train.epochs=3",
            "train.num_threads=1", "embed.score_samples=5", "embed.batch_rows=100"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embed-model")
    table = write_table_atomic(synthetic_table(300, 6, seed=1), root / "train.parquet")
    return train_model(table, root / "model", load_params(None, SETTINGS)).directory


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parts")
    for i, rows in enumerate((250, 120, 333)):
        df = synthetic_table(rows, 6, seed=10 + i)
        df["row_id"] += 1000 * i
        write_table_atomic(df, root / f"day-{i}.parquet")
    (root / ".hidden.parquet").write_bytes(b"not a table")  # skipped, like Spark's and DVC's files
    return root


def test_a_folder_becomes_a_folder_of_parts_in_order_with_provenance(model_dir: Path, folder: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "emb"
    rows = embed.run(str(model_dir), folder, out, load_params(None, SETTINGS))
    assert rows == 250 + 120 + 333
    parts = ["day-0.parquet", "day-1.parquet", "day-2.parquet"]
    assert sorted(p.name for p in out.iterdir()) == [PARTS_MANIFEST, *parts]
    assert own_parts(out) == parts  # the manifest names what a rerun may replace
    assert [p.name for p in tmp_path.iterdir()] == ["emb"]  # no temporary left beside it
    for i, part in enumerate(out / name for name in parts):
        frame = pd.read_parquet(part)
        source = pd.read_parquet(folder / part.name)
        assert frame["row_id"].tolist() == source["row_id"].tolist()  # one row per input row, in order
        prov = read_provenance(part)
        assert prov["input_file"] == f"day-{i}.parquet"
        assert prov["input_sha256"] == file_sha256(folder / part.name)
        assert prov["model_version"] == f"sha256:{file_sha256(model_dir / 'weights.pt')}"
    assert list(pd.read_parquet(out / "day-0.parquet").columns) == ["row_id", "z_0", "z_1", "log_likelihood", "anomaly"]


@pytest.mark.usefixtures("prefect_harness")
def test_a_local_dask_cluster_gives_the_same_parts_as_one_process(model_dir: Path, folder: Path,
                                                                   tmp_path: Path) -> None:
    from pipeline.orchestration.flows import embedding_flow

    params = load_params(None, SETTINGS)
    here = tmp_path / "here"
    embed.run(str(model_dir), folder, here, params)
    dask = tmp_path / "dask"
    result = embedding_flow(str(model_dir), folder, dask, load_params(None, [*SETTINGS, "embed.dask_address=local:2"]))
    assert result["rows"] == 703 and result["parts"] == 3
    assert sorted(p.name for p in dask.iterdir()) == sorted(p.name for p in here.iterdir())
    for part in here.glob("*.parquet"):
        a, b = pq.read_table(part), pq.read_table(dask / part.name)
        assert a.equals(b), part.name  # bit for bit, ids and scores included
        assert read_provenance(part) == read_provenance(dask / part.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dask", "here"]


def _embed_cmd(model_dir: Path, table: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "embed", str(model_dir), str(table), str(out),
            "--set", "data.id_columns=[row_id]", "--set", "embed.batch_rows=500", "--set", "embed.score_samples=20"]


def test_sigkill_mid_stream_leaves_nothing_and_the_rerun_completes(model_dir: Path, tmp_path: Path) -> None:
    table = write_table_atomic(synthetic_table(40_000, 6, seed=3), tmp_path / "big.parquet")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "emb.parquet"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(_embed_cmd(model_dir, table, out), stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    while "embedded" not in proc.stderr.readline():  # a few batches are written: mid-stream
        assert proc.poll() is None and time.monotonic() < deadline, "embed ended before streaming"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = list(out_dir.iterdir())
    assert leftovers and all(p.name.startswith(".emb.parquet.") for p in leftovers)  # its temporary
    done = subprocess.run(_embed_cmd(model_dir, table, out), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in out_dir.iterdir()] == ["emb.parquet"]  # the dead writer's file is gone
    assert pq.read_metadata(out).num_rows == 40_000
