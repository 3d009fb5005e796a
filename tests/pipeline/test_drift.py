"""Drift against a model's training distribution, and the out-of-range fraction (validate --against)."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from pipeline.config import DataParams, ValidateParams, load_params
from pipeline.drift import column_drift, drift_summary
from pipeline.schema import SKETCH_LEVELS, Schema
from pipeline.validate import ValidationReport, validate_table

DATA = DataParams(id_columns=("sample_id",))
PARAMS = ValidateParams()  # drift: fail


def table(n: int, seed: int, shift: dict[str, float] | None = None, df: float = 0.0) -> pd.DataFrame:
    """Correlated columns; df > 0 draws Student-t tails (values beyond the training range)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df, size=(n, 4)) if df else rng.normal(size=(n, 4))
    x[:, 3] = 0.8 * x[:, 0] + 0.6 * x[:, 3]
    frame = pd.DataFrame(x, columns=["a", "b", "c", "d"])
    for col, sd in (shift or {}).items():
        frame[col] += sd  # every column has sd ~1 in the training table
    frame.insert(0, "sample_id", np.arange(n))
    return frame


def run(df: pd.DataFrame, schema: Schema, params: ValidateParams = PARAMS) -> ValidationReport:
    return validate_table(df, data=DATA, params=params, against=schema, where="new.parquet")


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.from_frame(table(2000, seed=0), ["sample_id"])


def test_schema_stores_a_quantile_sketch_in_its_hash(schema: Schema) -> None:
    assert len(schema.quantiles) == 4 and all(len(q) == SKETCH_LEVELS for q in schema.quantiles)
    assert schema.quantiles[0][0] == schema.minimum[0] and schema.quantiles[0][-1] == schema.maximum[0]
    assert Schema.from_dict(schema.to_dict()) == schema
    edited = schema.to_dict()
    edited["quantiles"][1][3] += 1.0
    with pytest.raises(Exception, match="hash does not match"):
        Schema.from_dict(edited)


def test_a_schema_saved_before_the_sketch_still_loads_and_checks_moments(schema: Schema) -> None:
    old = {k: v for k, v in schema.to_dict().items() if k not in ("quantiles", "hash")}
    old["hash"] = Schema(**{**old, "hash": ""}).hash  # as such a model stored it
    loaded = Schema.from_dict(old)
    assert loaded.quantiles == () and loaded.hash == old["hash"]
    [a] = [d for d in column_drift(loaded, table(500, seed=3, shift={"a": 1.0}), PARAMS) if d.column == "a"]
    assert a.drifted and a.ks is None and a.shift_std == pytest.approx(1.0, abs=0.15)


def test_a_large_table_from_the_training_distribution_passes(schema: Schema) -> None:
    report = run(table(10_788, seed=1), schema)
    assert report.success, report.summary_lines()
    drift = [c for c in report.checks if c.name == "drift"]
    assert len(drift) == 4 and all(c.success for c in drift)


def test_a_few_values_beyond_the_training_range_are_a_reported_fraction() -> None:
    heavy = Schema.from_frame(table(1000, seed=0, df=1.5), ["sample_id"])
    report = run(table(10_788, seed=1, df=1.5), heavy)
    outside = [c for c in report.checks if c.name == "in_training_range" and c.message[0] != "0"]
    assert outside, "Student-t tails put some values beyond the widened training range"
    assert report.success and all("%) outside the training range" in c.message for c in outside)
    strict = run(table(10_788, seed=1, df=1.5), heavy, replace(PARAMS, max_out_of_range_fraction=0.0))
    assert {c.column for c in strict.failures()} == {c.column for c in outside}


def test_a_tiny_shift_on_a_large_table_is_not_drift(schema: Schema) -> None:
    new = table(20_000, seed=2, shift={"a": 0.12, "b": -0.12})
    [a, b] = [d for d in column_drift(schema, new, PARAMS) if d.column in "ab"]
    assert a.shift_p < 1e-3 and b.shift_p < 1e-3  # significant ...
    assert not a.drifted and not b.drifted  # ... but below validate.drift_max_shift_std
    assert run(new, schema).success


def test_shifted_columns_fail_named_with_their_shift_in_training_sd(schema: Schema) -> None:
    new = table(400, seed=4, shift={"b": 0.6, "c": -1.0})
    report = run(new, schema)
    assert not report.success
    assert {(c.name, c.column) for c in report.failures()} == {("drift", "b"), ("drift", "c")}
    [c] = [c for c in report.failures() if c.column == "c"]
    assert re.match(r"mean shifted -(0\.9|1\.0)\d training sd", c.message)
    assert drift_summary(column_drift(schema, new, PARAMS)).startswith("'b' (+0.6")

    warned = run(new, schema, replace(PARAMS, drift="warn"))
    assert warned.success and {c.column for c in warned.warnings()} == {"b", "c"}
    assert not any(c.name == "drift" for c in run(new, schema, replace(PARAMS, drift="off")).checks)


def test_a_changed_shape_with_the_same_moments_is_caught_by_the_sketch(schema: Schema) -> None:
    new = table(1000, seed=5)
    rng = np.random.default_rng(5)
    new["b"] = rng.choice([-1.0, 1.0], size=1000) + 0.05 * rng.normal(size=1000)  # bimodal, mean 0, sd ~1
    [b] = [d for d in column_drift(schema, new, PARAMS) if d.column == "b"]
    assert abs(b.shift_std) < 0.25 and b.ks is not None and b.ks > 0.15 and b.drifted
    assert {c.column for c in run(new, schema).failures()} == {"b"}


def test_binary_columns_from_the_same_distribution_do_not_drift() -> None:
    rng = np.random.default_rng(6)

    def draw(n: int) -> pd.DataFrame:
        return pd.DataFrame({"sample_id": np.arange(n), "flag": rng.random(n) < 0.3,
                             "x": rng.normal(size=n)})

    schema = Schema.from_frame(draw(3000), ["sample_id"])
    assert not any(d.drifted for d in column_drift(schema, draw(5000), PARAMS))


def test_a_bare_off_in_yaml_turns_drift_off(tmp_path) -> None:
    """YAML 1.1 reads `off` as false: `--set validate.drift=off` and `drift: off` still mean off."""
    (tmp_path / "params.yaml").write_text("validate:\n  drift: off\n  iid: off\n")
    assert load_params(tmp_path / "params.yaml").validate.drift == "off"
    assert load_params(None, ["validate.drift=off", "validate.iid=off"]).validate.iid == "off"
    with pytest.raises(Exception, match="validate.drift is True; choose one of fail, warn, off"):
        load_params(None, ["validate.drift=on"])
