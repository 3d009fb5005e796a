from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.contract.columns import split_features, to_tensor
from pipeline.errors import PipelineError
from pipeline.io.sources import load_source
from pipeline.io.tables import iter_table_batches, read_table, write_table_atomic
from tests.pipeline.helpers import clean_table

PNG_BYTES = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4


@pytest.fixture
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(1000, 4)), columns=["a", "b", "c", "d"])
    df.insert(0, "sample_id", np.arange(1000))
    return df


@pytest.mark.parametrize("name", ["t.parquet", "t.pq", "t.csv"])
def test_write_then_read_round_trip(tmp_path: Path, frame: pd.DataFrame, name: str) -> None:
    path = write_table_atomic(frame, tmp_path / name)
    back = read_table(path)
    pd.testing.assert_frame_equal(back, frame, check_exact=False, rtol=1e-12)
    assert list(read_table(path, columns=["c", "a"]).columns) == ["c", "a"]
    assert [list(b.columns) for b in iter_table_batches(path, 600, columns=["d", "b"])] == [
        ["d", "b"]
    ] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary left behind


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"nope\.parquet does not exist"):
        read_table(tmp_path / "nope.parquet")


def test_truncated_parquet_is_named(tmp_path: Path, frame: pd.DataFrame) -> None:
    good = write_table_atomic(frame, tmp_path / "good.parquet").read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(
        PipelineError, match=r"cut\.parquet is not a readable Parquet table: "
    ) as err:
        read_table(cut)
    assert "\n" not in str(err.value)
    with pytest.raises(PipelineError, match=r"cut\.parquet is not a readable Parquet table"):
        iter_table_batches(cut, 100)


@pytest.mark.parametrize(("name", "kind"), [("img.parquet", "Parquet"), ("img.csv", "CSV")])
def test_png_bytes_are_not_a_table(tmp_path: Path, name: str, kind: str) -> None:
    path = tmp_path / name
    path.write_bytes(PNG_BYTES)
    with pytest.raises(
        PipelineError, match=rf"img\.{path.suffix[1:]} is not a readable {kind} table"
    ):
        read_table(path)
    with pytest.raises(
        PipelineError, match=rf"img\.{path.suffix[1:]} is not a readable {kind} table"
    ):
        list(iter_table_batches(path, 10))


def test_empty_tables_are_named(tmp_path: Path, frame: pd.DataFrame) -> None:
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("a,b\n")
    write_table_atomic(frame.iloc[:0], tmp_path / "norows.parquet")
    with pytest.raises(PipelineError, match=r"empty\.csv is empty"):
        read_table(tmp_path / "empty.csv")
    with pytest.raises(PipelineError, match=r"header\.csv has no rows"):
        read_table(tmp_path / "header.csv")
    with pytest.raises(PipelineError, match=r"norows\.parquet has no rows"):
        read_table(tmp_path / "norows.parquet")
    with pytest.raises(PipelineError, match=r"norows\.parquet has no rows"):
        list(iter_table_batches(tmp_path / "norows.parquet", 10))


def test_unknown_suffix_names_file_and_formats(tmp_path: Path) -> None:
    path = tmp_path / "table.xlsx"
    path.write_text("a\n1\n")
    with pytest.raises(PipelineError, match=r"table\.xlsx.*\.parquet, \.pq, \.csv"):
        read_table(path)


def test_unreadable_csv_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("a,b\n1,2\n3,4,5,6\n")
    with pytest.raises(PipelineError, match=r"ragged\.csv is not a readable CSV table") as err:
        read_table(path)
    assert "\n" not in str(err.value)


def test_missing_requested_column_is_named(tmp_path: Path, frame: pd.DataFrame) -> None:
    path = write_table_atomic(frame, tmp_path / "t.parquet")
    with pytest.raises(PipelineError, match=r"t\.parquet: missing columns 'zz'"):
        read_table(path, columns=["a", "zz"])


@pytest.mark.parametrize("name", ["t.parquet", "t.csv"])
def test_iter_table_batches_streams_in_order(
    tmp_path: Path, frame: pd.DataFrame, name: str
) -> None:
    path = write_table_atomic(frame, tmp_path / name)
    batches = list(iter_table_batches(path, 300))
    assert [len(b) for b in batches] == [300, 300, 300, 100]
    joined = pd.concat(batches, ignore_index=True)
    pd.testing.assert_frame_equal(joined, frame, check_exact=False, rtol=1e-12)


def test_iter_table_batches_checks_the_file_before_iterating(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="does not exist"):
        iter_table_batches(tmp_path / "missing.parquet", 10)  # raised on call, not on first next()


def test_split_features_passes_ids_and_casts_bools(frame: pd.DataFrame) -> None:
    df = frame.assign(flag=frame["a"] > 0)
    ids, features = split_features(df, ["sample_id"], "t.csv")
    assert list(ids.columns) == ["sample_id"]
    assert ids["sample_id"].tolist() == list(range(1000))
    assert list(features.columns) == ["a", "b", "c", "d", "flag"]
    assert set(features["flag"].unique()) == {0, 1}


def test_split_features_keeps_text_and_names_other_non_numeric_columns() -> None:
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0], "name": ["x", "y", "x"]})
    assert list(split_features(df, [], "data/new.csv")[1].columns) == ["a", "name"]  # text: categorical
    when = df.assign(when=pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03"]))
    with pytest.raises(PipelineError, match=r"data/new\.csv: column 'when' \(datetime64.*\) is neither numeric nor text"):
        split_features(when, [], "data/new.csv")


def test_split_features_names_missing_id_column() -> None:
    df = pd.DataFrame({"a": [1.0, 2.0]})
    with pytest.raises(PipelineError, match=r"t\.parquet: missing id column 'sample_id'"):
        split_features(df, ["sample_id"], "t.parquet")


def test_to_tensor_copies_into_float32(tmp_path: Path, frame: pd.DataFrame) -> None:
    df = read_table(write_table_atomic(frame[["a", "b"]], tmp_path / "t.parquet"))
    y = to_tensor(df)
    assert y.dtype == torch.float32 and y.shape == (1000, 2)
    y[0, 0] = 123.0  # writable, and a copy
    assert df.iloc[0, 0] != 123.0
    nullable = pd.DataFrame({"k": pd.array([1, None, 3], dtype="Int64")})
    assert torch.isnan(to_tensor(nullable)[1, 0])


def test_write_table_atomic_leaves_nothing_partial(tmp_path: Path, frame: pd.DataFrame) -> None:
    path = write_table_atomic(frame, tmp_path / "out.parquet")
    before = path.read_bytes()
    bad = pd.DataFrame({"mixed": [1, "two", 3.0]})  # pyarrow cannot type this column
    with pytest.raises(Exception):  # noqa: B017 - whatever pyarrow raises
        write_table_atomic(bad, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_load_source_sklearn() -> None:
    df = load_source("sklearn:breast_cancer")
    assert df.shape == (569, 30)
    assert df.columns[0] == "mean radius" and "target" not in df.columns
    assert load_source("sklearn:wine").shape == (178, 13)
    assert load_source("sklearn:diabetes").shape == (442, 10)


def test_load_source_synthetic_is_seeded() -> None:
    a = load_source("synthetic:200x6", seed=1)
    assert list(a.columns) == ["row_id", *(f"x{j}" for j in range(6))]
    assert a["row_id"].tolist() == list(range(200))
    pd.testing.assert_frame_equal(a, load_source("synthetic:200x6", seed=1))
    assert not np.allclose(a["x0"], load_source("synthetic:200x6", seed=2)["x0"])
    assert np.isfinite(a.to_numpy()).all() and (a.drop(columns="row_id").std() > 0.1).all()


@pytest.mark.parametrize(
    "source", ["sklearn:nope", "synthetic:100", "synthetic:0x3", "synthetic:ax3"]
)
def test_load_source_bad_spec_names_the_key(source: str) -> None:
    with pytest.raises(PipelineError, match="data.source"):
        load_source(source)


def test_load_source_reads_a_path(tmp_path: Path, frame: pd.DataFrame) -> None:
    path = write_table_atomic(frame, tmp_path / "t.csv")
    assert load_source(str(path)).shape == frame.shape
    with pytest.raises(PipelineError, match="does not exist"):
        load_source(str(tmp_path / "other.csv"))


@pytest.mark.parametrize("decimal", [".", ","])
def test_a_semicolon_delimited_csv_is_read_as_its_columns(tmp_path, decimal):
    df = clean_table(n=50)
    path = tmp_path / "semi.csv"
    df.to_csv(path, sep=";", decimal=decimal, index=False)
    back = read_table(path)
    assert list(back.columns) == list(df.columns)
    pd.testing.assert_frame_equal(back, df, check_exact=False, rtol=1e-12)
    assert pd.concat(iter_table_batches(path, 17)).reset_index(drop=True).equals(back)
