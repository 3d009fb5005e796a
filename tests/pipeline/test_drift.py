"""Drift against a model's training distribution, and the out-of-range fraction (validate --against)."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import DataParams, ValidateParams, load_params
from pipeline.contract.drift import Drift, column_drift, drift_summary
from pipeline.contract.schema import SKETCH_LEVELS, Schema
from pipeline.stages.validate import ValidationReport, validate_table

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


def _step_cdf(q: np.ndarray, t: np.ndarray, side: str) -> np.ndarray:
    """The sketch's CDF at t (side right) or just left of t (side left)."""
    return np.clip((np.searchsorted(q, t, side) - 1) / (q.size - 1), 0, 1)


def _whole_table_drift(schema: Schema, df: pd.DataFrame, params: ValidateParams) -> list[Drift]:
    """The drift statistics from their definitions over all of df at once (no sketch counts, no
    merging): the reference that the streamed DriftStats must reproduce."""
    from scipy import stats

    alpha, out = params.drift_alpha / len(schema.features), []
    for j, name in enumerate(schema.features):
        x = df[name].to_numpy(dtype=np.float64, na_value=np.nan)
        x = np.sort(x[np.isfinite(x)])
        n, q = x.size, np.asarray(schema.quantiles[j])
        shift = (x.mean() - schema.mean[j]) / schema.std[j]
        p = float(stats.ttest_ind_from_stats(x.mean(), x.std(ddof=1), n, schema.mean[j], schema.std[j],
                                             schema.n_rows, equal_var=False).pvalue)
        # sup |F_n - G| over every jump of either step function, at it and just left of it
        t = np.union1d(x, q)
        ks = float(max(np.abs(np.searchsorted(x, t, "right") / n - _step_cdf(q, t, "right")).max(),
                       np.abs(np.searchsorted(x, t, "left") / n - _step_cdf(q, t, "left")).max()))
        ks_p = float(stats.kstwobign.sf(np.sqrt(n * schema.n_rows / (n + schema.n_rows)) * ks))
        drifted = (abs(shift) > params.drift_max_shift_std and p < alpha) or (ks > params.drift_max_ks and ks_p < alpha)
        out.append(Drift(name, n, float(shift), p, ks, ks_p, drifted))
    return out


def _awkward_table(n: int, seed: int) -> pd.DataFrame:
    """float64, float32 and integer columns; NaN and inf cells; float32 values on and beside the
    training sketch's points (which float32 cannot hold); one shifted, one reshaped column."""
    rng = np.random.default_rng(seed)
    df = table(n, seed)
    df["b"] = (df["b"] + 0.4).astype(np.float32)  # shifted: drifts
    df["c"] = rng.choice([-1.0, 1.0], size=n) + 0.05 * rng.normal(size=n)  # reshaped: drifts by KS
    df["k"] = rng.integers(0, 4, size=n).astype(np.int16)
    df.loc[::11, "a"] = np.nan
    df.loc[5, "a"] = np.inf
    return df


@pytest.mark.parametrize("narrow", [False, True], ids=["float64", "float32"])
def test_the_streamed_sketch_gives_the_whole_table_verdict_and_statistics(narrow: bool) -> None:
    """float32: every feature column is one float32 holds exactly, so the sketch counts float32
    values against the float64 sketch points rounded outwards (_float32_bounds)."""
    from pipeline.contract.drift import DriftStats

    train = table(2000, seed=0).assign(k=np.random.default_rng(0).integers(0, 4, size=2000))
    schema = Schema.from_frame(train, ["sample_id"])
    new = _awkward_table(5000, seed=7)
    points = np.asarray(schema.quantiles[3])  # 'd': float64 points; float32 values on and beside them
    near = points.astype(np.float32)
    new["d"] = new["d"].astype(np.float32)
    new.loc[: 3 * points.size - 1, "d"] = np.concatenate([near, np.nextafter(near, np.float32(np.inf)),
                                                        np.nextafter(near, np.float32(-np.inf))])
    if narrow:
        new = new.astype({c: np.float32 for c in "abcd"})
    want = _whole_table_drift(schema, new, PARAMS)
    assert {d.column for d in want if d.drifted} == {"b", "c"}  # the case has both verdicts
    for rows in (97, 5000):  # batches, as embed streams them, and the whole table at once
        stats = DriftStats(schema)
        for start in range(0, len(new), rows):
            stats.update(new.iloc[start : start + rows])
        got = stats.drifts(PARAMS)
        assert [(d.column, d.n_rows, d.drifted) for d in got] == [(d.column, d.n_rows, d.drifted) for d in want]
        for g, w in zip(got, want, strict=True):
            assert g.shift_std == pytest.approx(w.shift_std, rel=1e-10, abs=1e-12), g.column
            assert g.shift_p == pytest.approx(w.shift_p, rel=1e-8, abs=1e-300), g.column
            assert g.ks == w.ks and g.ks_p == w.ks_p, g.column  # counts are exact: no rounding
        for j, name in enumerate(schema.features):  # the counts behind ks: < and <= each sketch point
            x = new[name].to_numpy(np.float64, na_value=np.nan)
            u = np.unique(schema.quantiles[j])
            assert (stats.below[j, : u.size] == (x[:, None] < u).sum(axis=0)).all(), name
            assert (stats.at_most[j, : u.size] == (x[:, None] <= u).sum(axis=0)).all(), name
    assert column_drift(schema, new, PARAMS) == stats.drifts(PARAMS)


def test_float32_cells_are_read_as_they_are_without_a_second_conversion() -> None:
    """update(df, cells): the model's float32 features stand in for df's columns only where
    float32 holds those exactly; the statistics are the same either way."""
    from pipeline.contract.drift import DriftStats

    schema = Schema.from_frame(table(2000, seed=0), ["sample_id"])
    new = table(3000, seed=8).astype({c: np.float32 for c in "abcd"})
    new.loc[::13, "b"] = np.nan
    cells = torch.from_numpy(new[list(schema.features)].to_numpy(np.float32))
    by_cells, by_frame = DriftStats(schema), DriftStats(schema)
    by_cells.update(new, cells)
    by_frame.update(new)
    assert by_cells.drifts(PARAMS) == by_frame.drifts(PARAMS)
    wide = new.astype({"a": np.float64})
    wide.loc[0, "a"] = 0.1  # float32 rounds it: the cells are not the table's values
    cells[0, 0] = 12345.0  # ... and would be ignored
    by_cells, by_frame = DriftStats(schema), DriftStats(schema)
    by_cells.update(wide, cells)
    by_frame.update(wide)
    assert by_cells.drifts(PARAMS) == by_frame.drifts(PARAMS)


def test_float32_bounds_compare_as_float64_does() -> None:
    from pipeline.contract.drift import _float32_bounds

    rng = np.random.default_rng(9)
    u = np.concatenate([rng.normal(size=500) * 10.0 ** rng.integers(-30, 30, size=500),
                        [0.0, 1.0, 0.1, 3.5e38, -3.5e38, 1e300, -1e300, float(np.finfo(np.float32).max)]])
    lower, upper = _float32_bounds(u[None, :])
    with np.errstate(over="ignore"):
        near = u.astype(np.float32)
        x = np.concatenate([near, np.nextafter(near, np.float32(np.inf)), np.nextafter(near, np.float32(-np.inf)),
                            rng.normal(size=200).astype(np.float32)])
    x = x[np.isfinite(x)]
    xs, us = x[:, None], u[None, :]
    assert ((xs.astype(np.float64) < us) == (xs < lower)).all()
    assert ((xs.astype(np.float64) <= us) == (xs <= upper)).all()
