from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import DataParams
from pipeline.errors import PipelineError
from pipeline.io.tables import read_table, write_table_atomic
from pipeline.stages.prepare import prepare, split_rows


def test_prepare_is_byte_for_byte_deterministic(tmp_path: Path) -> None:
    data = DataParams(source="synthetic:500x4", id_columns=("row_id",), seed=3)
    first = prepare(data, 0.1, tmp_path / "one")
    second = prepare(data, 0.1, tmp_path / "two")
    assert set(first) == {"train", "val", "test"}
    for name in first:
        assert first[name] == tmp_path / "one" / f"{name}.parquet"
        assert first[name].read_bytes() == second[name].read_bytes()
    other = prepare(DataParams(source="synthetic:500x4", seed=4), 0.1, tmp_path / "three")
    assert other["test"].read_bytes() != first["test"].read_bytes()


def test_prepare_splits_sizes_disjoint_and_in_original_order(tmp_path: Path) -> None:
    data = DataParams(source="synthetic:1000x3", id_columns=("row_id",), test_fraction=0.2, seed=0)
    paths = prepare(data, 0.25, tmp_path)
    parts = {name: read_table(path) for name, path in paths.items()}
    assert {k: len(v) for k, v in parts.items()} == {"test": 200, "val": 200, "train": 600}
    ids = {k: v["row_id"].to_numpy() for k, v in parts.items()}
    for name, rows in ids.items():
        assert (np.diff(rows) > 0).all(), f"{name} lost the original row order"
    assert sorted(np.concatenate(list(ids.values())).tolist()) == list(range(1000))
    assert isinstance(parts["train"].index, pd.RangeIndex)
    assert "__index_level_0__" not in parts["train"].columns


def test_prepare_keeps_every_column_of_a_path_source(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {"sample": [f"s{i}" for i in range(50)], "a": np.arange(50.0), "b": np.ones(50)}
    )
    src = write_table_atomic(df, tmp_path / "src.csv")
    paths = prepare(DataParams(source=str(src), id_columns=("sample",)), 0.1, tmp_path / "out")
    joined = pd.concat([read_table(p) for p in paths.values()]).sort_values("a", ignore_index=True)
    pd.testing.assert_frame_equal(joined, df, check_dtype=False)


def test_prepare_breast_cancer_default_split(tmp_path: Path) -> None:
    paths = prepare(DataParams(), 0.1, tmp_path)
    sizes = {name: read_table(path).shape for name, path in paths.items()}
    assert sizes == {"test": (114, 30), "val": (46, 30), "train": (409, 30)}


def test_prepare_refuses_an_empty_split(tmp_path: Path) -> None:
    src = write_table_atomic(pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0]}), tmp_path / "tiny.csv")
    with pytest.raises(PipelineError, match=r"test split .* empty.*data\.test_fraction"):
        prepare(DataParams(source=str(src), test_fraction=0.1), 0.5, tmp_path / "out")
    with pytest.raises(PipelineError, match=r"val split .* empty.*train\.val_fraction"):
        prepare(DataParams(source=str(src), test_fraction=0.25), 0.0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_split_rows_is_a_sorted_partition() -> None:
    rows = split_rows(101, 0.3, 0.2, seed=7)
    assert all((np.diff(r) > 0).all() for r in rows.values())
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(101))
    assert len(rows["test"]) == 30 and len(rows["val"]) == 14


def test_the_validation_split_holds_at_most_val_max_rows() -> None:
    """train.val_max_rows caps prepare's val split as it caps fit()'s own: the rest trains."""
    rows = split_rows(50_000, 0.2, 0.1, seed=0, val_max_rows=1000)
    assert (len(rows["test"]), len(rows["val"]), len(rows["train"])) == (10_000, 1000, 39_000)
    assert len(split_rows(500, 0.2, 0.1, seed=0, val_max_rows=1000)["val"]) == 40  # below the cap: the fraction
