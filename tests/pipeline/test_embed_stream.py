"""The streamed embedding (issue 20): the reading thread checks, converts and summarizes each batch,
the other encodes and writes; the output and its drift report are those of the whole table at once."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import load_params
from pipeline.contract.columns import to_tensor
from pipeline.contract.drift import column_drift
from pipeline.contract.model import LoadedModel, load_model_dir
from pipeline.errors import PipelineError
from pipeline.io.sources import synthetic_table
from pipeline.io.tables import write_table_atomic
from pipeline.stages.embed import DRIFT_KEY, embed_file, embed_frame, read_drift
from pipeline.stages.train import train_model

SETTINGS = ["data.id_columns=[row_id]", "model.latent_dim=2", "model.hidden_dims=[16]", "train.epochs=2",
            "train.num_threads=1", "embed.score_samples=0", "embed.batch_rows=100"]
PARAMS = load_params(None, SETTINGS)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    root = tmp_path_factory.mktemp("stream-model")
    table = write_table_atomic(synthetic_table(400, 5, seed=1), root / "train.parquet")
    return load_model_dir(train_model(table, root / "model", PARAMS).directory)


def _new_rows(n: int, float32: bool) -> pd.DataFrame:
    df = synthetic_table(n, 5, seed=2)
    df["x1"] += 0.8 * df["x1"].std()  # one drifted column
    return df.astype({f"x{j}": np.float32 for j in range(5)}) if float32 else df


@pytest.mark.parametrize("float32", [True, False], ids=["float32", "float64"])
def test_the_stream_writes_the_whole_table_s_embedding_and_drift(model: LoadedModel, tmp_path: Path,
                                                                  float32: bool) -> None:
    df = _new_rows(1234, float32)  # 13 batches of 100 rows, the last one short
    path = tmp_path / "new.parquet"
    df.to_parquet(path, index=False)
    assert embed_file(model, path, tmp_path / "out.parquet", PARAMS.embed, drift=PARAMS.validate) == 1234
    got = pq.read_table(tmp_path / "out.parquet")
    whole = embed_frame(model, df, PARAMS.embed)
    assert got.column_names == ["row_id", "z_0", "z_1"]
    assert got.to_pandas().equals(whole)  # bit for bit: the same blocks as one call
    keys = set(pq.read_metadata(tmp_path / "out.parquet").metadata)  # no provenance asked for
    assert keys == {b"pandas", b"ARROW:schema", DRIFT_KEY}
    want = column_drift(model.schema, df, PARAMS.validate)
    report = read_drift(tmp_path / "out.parquet")
    assert [d["column"] for d in report if d["drifted"]] == ["x1"]
    assert len(report) == len(want)
    for d, w in zip(report, (asdict(w) for w in want), strict=True):
        assert (d["column"], d["n_rows"], d["drifted"]) == (w["column"], w["n_rows"], w["drifted"])
        for key in ("shift_std", "shift_p", "ks", "ks_p"):
            assert d[key] == pytest.approx(w[key], rel=1e-9, abs=1e-300), (d["column"], key)


def test_float_columns_are_written_without_dictionary_pages(model: LoadedModel, tmp_path: Path) -> None:
    """Dictionary encoding, tried on float columns of distinct values, cost most of a batch's write."""
    path = tmp_path / "new.parquet"
    _new_rows(300, True).to_parquet(path, index=False)
    embed_file(model, path, tmp_path / "out.parquet", PARAMS.embed)
    meta = pq.ParquetFile(tmp_path / "out.parquet").metadata
    for i in range(meta.num_columns):
        column = meta.row_group(0).column(i)
        dictionary = any("DICTIONARY" in e for e in column.encodings)
        assert dictionary == (column.path_in_schema == "row_id"), (column.path_in_schema, column.encodings)


def test_a_bad_batch_is_named_by_its_rows_and_nothing_is_written(model: LoadedModel, tmp_path: Path) -> None:
    df = _new_rows(1000, True)
    df.loc[537, "x3"] = np.nan  # in the sixth batch, read and checked by the reading thread
    path = tmp_path / "new.parquet"
    df.to_parquet(path, index=False)
    with pytest.raises(PipelineError, match=r"new.parquet \(rows 500\.\.\).*'x3'.*row 37"):
        embed_file(model, path, tmp_path / "out.parquet", PARAMS.embed, drift=PARAMS.validate)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.parquet"]


@pytest.mark.parametrize("float32", [True, False], ids=["float32", "float64"])
def test_features_are_the_checked_conversion(model: LoadedModel, float32: bool) -> None:
    df = _new_rows(50, float32).sample(frac=1.0, axis=1, random_state=0)  # columns in another order
    y = model.features(df, "t")
    assert torch.equal(y, to_tensor(df[list(model.schema.features)], "t"))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda df: df.drop(columns=["x2"]), r"t: missing column 'x2'"),
    (lambda df: df.assign(extra=1.0), r"t: extra column 'extra'"),
    (lambda df: df.assign(x4="a"), r"t: non-numeric column 'x4'"),
    (lambda df: df.assign(x0=df["x0"].where(df.index != 7)), r"t: .*'x0'.*row 7"),
    (lambda df: df.assign(x0=df["x0"].where(df.index != 7, np.inf)), r"t: .*'x0'.*row 7"),
    (lambda df: df.assign(x3=df["x3"].where(df.index != 9, 1e39)), r"t: column 'x3' row 9 holds 1e\+39, beyond float32"),
], ids=["missing", "extra", "text", "nan", "inf", "overflow"])
def test_a_batch_that_breaks_the_contract_is_named(model: LoadedModel, edit, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        model.features(edit(_new_rows(20, False)), "t")
