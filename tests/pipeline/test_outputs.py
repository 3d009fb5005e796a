"""Folder outputs replace only what vaepipe wrote; sample streams; metrics are strict JSON (issue 22).

The refusals (OUTPUT that holds the input, a model, a user's folder, the working folder) are cases
of tests/pipeline/test_bad_input.py; here is what a folder of vaepipe's own gets on a rerun.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.io.outputs import PARTS_MANIFEST, own_parts
from pipeline.stages import embed, sample
from pipeline.stages.evaluate import metrics_json
from tests.pipeline.helpers import FAST_ARGS, clean_table


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    table = root / "train.parquet"
    clean_table(n=200, seed=1).to_parquet(table, index=False)
    assert main(["train", str(table), "--out", str(root / "m"), *FAST_ARGS]) == 0
    return root / "m"


def _folder(path: Path, names: dict[str, int]) -> Path:
    path.mkdir()
    for name, seed in names.items():
        clean_table(n=40, seed=seed).to_parquet(path / name, index=False)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_rerun_replaces_its_own_parts_and_keeps_every_other_file(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = _folder(tmp_path / "monday", {"a.parquet": 1, "b.parquet": 2})
    assert main(["embed", str(model), str(first), "out", *FAST_ARGS]) == 0
    assert sorted(p.name for p in Path("out").iterdir()) == [PARTS_MANIFEST, "a.parquet", "b.parquet"]
    Path("out/notes.txt").write_text("mine\n")
    Path("out/.hidden").write_text("mine too\n")
    second = _folder(tmp_path / "tuesday", {"a.parquet": 3, "c.parquet": 4})
    assert main(["embed", str(model), str(second), "out", *FAST_ARGS]) == 0
    names = sorted(p.name for p in Path("out").iterdir())
    assert names == [".hidden", PARTS_MANIFEST, "a.parquet", "c.parquet", "notes.txt"]  # b: ours, now stale
    assert Path("out/notes.txt").read_text() == "mine\n" and Path("out/.hidden").read_text() == "mine too\n"
    assert embed.read_provenance(Path("out/a.parquet"))["input_sha256"] == _digest(second / "a.parquet")
    assert own_parts(Path("out")) == ["a.parquet", "c.parquet"]


def test_an_empty_folder_and_a_folder_written_before_the_manifest_are_outputs(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    days = _folder(tmp_path / "days", {"a.parquet": 1})
    Path("empty").mkdir()
    assert main(["embed", str(model), str(days), "empty", *FAST_ARGS]) == 0
    assert (tmp_path / "empty" / "a.parquet").is_file()
    (tmp_path / "empty" / PARTS_MANIFEST).unlink()  # as an older vaepipe left it: parts with provenance only
    assert own_parts(tmp_path / "empty") == ["a.parquet"]
    assert main(["embed", str(model), str(days), "empty", *FAST_ARGS]) == 0
    (tmp_path / "empty" / PARTS_MANIFEST).unlink()
    clean_table(n=5).to_parquet(tmp_path / "empty" / "foreign.parquet")  # no provenance: not ours
    assert own_parts(tmp_path / "empty") is None
    assert main(["embed", str(model), str(days), "empty", *FAST_ARGS]) == 2


def test_sample_streams_in_row_groups_and_draws_the_rows_of_one_call(model, tmp_path, monkeypatch):
    whole = tmp_path / "whole.parquet"
    assert main(["sample", str(model), "10000", str(whole)]) == 0  # one batch
    monkeypatch.setattr(sample, "SAMPLE_BATCH_ROWS", 4096)
    streamed, csv = tmp_path / "streamed.parquet", tmp_path / "streamed.csv"
    assert main(["sample", str(model), "10000", str(streamed)]) == 0
    assert main(["sample", str(model), "10000", str(csv)]) == 0
    assert pq.ParquetFile(whole).metadata.num_row_groups == 1
    assert pq.ParquetFile(streamed).metadata.num_row_groups == math.ceil(10000 / 4096)  # a batch at a time
    rows = pd.read_parquet(streamed)
    pd.testing.assert_frame_equal(rows, pd.read_parquet(whole))  # one stream of draws, whatever the batches
    back = pd.read_csv(csv)
    assert list(back.columns) == list(rows.columns)
    np.testing.assert_allclose(back.to_numpy(), rows.to_numpy(), rtol=1e-6)


def test_metrics_json_is_strict_json():
    text = metrics_json({"log_likelihood": float("-inf"), "kl_per_dim": [0.5, float("nan")],
                         "baselines": {"full_gauss": float("inf")}, "n_rows": 3})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON")) == {
        "log_likelihood": None, "kl_per_dim": [0.5, None], "baselines": {"full_gauss": None}, "n_rows": 3}


def test_an_allocation_that_fails_is_the_users_size(model, tmp_path, monkeypatch, capsys):
    def too_big(*args: object, **kwargs: object) -> None:
        raise MemoryError("Unable to allocate 1.46 TiB for an array with shape (100000000000, 2)")

    monkeypatch.setattr(sample, "sample", too_big)
    assert main(["sample", str(model), "10", str(tmp_path / "s.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vaepipe: error: not enough memory: Unable to allocate 1.46 TiB") and "\n" not in err
    assert list(tmp_path.iterdir()) == []
