from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.contract.schema import Schema
from pipeline.errors import PipelineError


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sample_id": ["s0", "s1", "s2", "s3"],
            "a": [1.0, 2.0, np.nan, 5.0],
            "b": [0, 1, 2, 3],
            "flag": [True, False, True, True],
        }
    )


def test_from_frame_describes_features_only(frame: pd.DataFrame) -> None:
    s = Schema.from_frame(frame, ["sample_id"])
    assert s.features == ("a", "b", "flag")
    assert s.dtypes == ("float64", "int64", "bool")
    assert s.id_columns == ("sample_id",)
    assert s.n_rows == 4
    assert s.mean == pytest.approx((8 / 3, 1.5, 0.75))  # NaN-aware
    assert s.std == pytest.approx(
        (np.std([1.0, 2.0, 5.0]), np.std([0, 1, 2, 3]), np.std([1, 0, 1, 1]))
    )
    assert (s.minimum, s.maximum) == ((1.0, 0.0, 0.0), (5.0, 3.0, 1.0))
    assert len(s.hash) == 64


def test_round_trip_through_json_keeps_the_hash(frame: pd.DataFrame) -> None:
    s = Schema.from_frame(frame, ["sample_id"])
    back = Schema.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and back.hash == s.hash


def test_hash_covers_every_field(frame: pd.DataFrame) -> None:
    s = Schema.from_frame(frame, ["sample_id"])
    other = Schema.from_frame(frame.assign(a=frame["a"] + 1e-9), ["sample_id"])
    assert other.hash != s.hash


@pytest.mark.parametrize(
    ("key", "value"),
    [("mean", [0.0, 1.5, 0.75]), ("features", ["a", "b", "zz"]), ("n_rows", 5)],
)
def test_from_dict_detects_tampering(frame: pd.DataFrame, key: str, value: object) -> None:
    d = Schema.from_frame(frame, ["sample_id"]).to_dict()
    d[key] = value
    with pytest.raises(PipelineError, match=r"model\.json: the schema's hash does not match"):
        Schema.from_dict(d, where="model.json")


def test_from_dict_rejects_a_foreign_mapping() -> None:
    with pytest.raises(PipelineError, match="not a schema"):
        Schema.from_dict({"features": ["a"]})


def test_check_names_missing_and_extra_columns(frame: pd.DataFrame) -> None:
    s = Schema.from_frame(frame, ["sample_id"])
    new = frame.drop(columns=["a", "b"]).assign(zz=1.0)
    with pytest.raises(PipelineError) as err:
        s.check(new, "data/new.csv")
    message = str(err.value)
    assert message.startswith("data/new.csv: missing columns 'a', 'b'; extra column 'zz'")
    assert "trained on 3 columns: 'a', 'b', 'flag'" in message
    assert "\n" not in message


def test_check_names_a_missing_id_column_and_a_text_column(frame: pd.DataFrame) -> None:
    s = Schema.from_frame(frame, ["sample_id"])
    with pytest.raises(PipelineError, match=r"missing column 'sample_id'"):
        s.check(frame.drop(columns="sample_id"), "t.csv")
    with pytest.raises(PipelineError, match=r"non-numeric column 'b' \(str\)"):
        s.check(frame.assign(b=["x", "y", "z", "w"]), "t.csv")


def test_check_accepts_another_column_order(frame: pd.DataFrame) -> None:
    s = Schema.from_frame(frame, ["sample_id"])
    shuffled = frame[["flag", "b", "sample_id", "a"]]
    s.check(shuffled, "t.csv")
    assert list(s.features_in_order(shuffled).columns) == ["a", "b", "flag"]


def test_from_frame_refuses_text_and_empty_columns(frame: pd.DataFrame) -> None:
    with pytest.raises(PipelineError, match="t.csv: text column 'sample_id' holds 4 distinct values in 4 rows: an identifier"):
        Schema.from_frame(frame, [], where="t.csv")
    with pytest.raises(PipelineError, match="column 'a' has no observed value"):
        Schema.from_frame(frame.assign(a=np.nan), ["sample_id"])


def test_widened_range(frame: pd.DataFrame) -> None:
    s = Schema.from_frame(frame, ["sample_id"])
    assert s.widened_range(0.5)[0] == pytest.approx((-1.0, 7.0))
