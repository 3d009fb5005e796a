from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import DataParams, Params, ValidateParams
from pipeline.contract.iid import iid_stats
from pipeline.contract.schema import Schema
from pipeline.errors import PipelineError
from pipeline.io.sources import load_source
from pipeline.io.tables import read_table, write_table_atomic
from pipeline.stages.prepare import prepare
from pipeline.stages.validate import ValidationReport, validate_path, validate_table

DATA = DataParams(id_columns=("sample_id",))
STRICT = ValidateParams()  # iid: fail


@pytest.fixture
def clean() -> pd.DataFrame:
    rng = np.random.default_rng(42)
    df = pd.DataFrame(rng.normal(size=(300, 5)), columns=[f"x{j}" for j in range(5)])
    df["x4"] = df["x0"] * 2 + 0.1 * df["x4"]  # correlated columns are fine
    df.insert(0, "sample_id", [f"s{i}" for i in range(300)])
    return df


def run(df: pd.DataFrame, **kw: object) -> ValidationReport:
    data = kw.pop("data", DATA)
    params = kw.pop("params", STRICT)
    return validate_table(df, data=data, params=params, where="t.parquet", **kw)  # type: ignore[arg-type]


def failed(report: ValidationReport) -> set[tuple[str, str | None]]:
    return {(c.name, c.column) for c in report.failures()}


def test_clean_table_passes(clean: pd.DataFrame) -> None:
    report = run(clean)
    assert report.success and not report.failures() and not report.warnings()
    assert report.n_rows == 300
    names = {c.name for c in report.checks}
    assert {
        "columns",
        "row_count",
        "numeric",
        "no_nulls",
        "finite",
        "not_constant",
        "duplicates",
        "autocorrelation",
        "trend",
        "shift",
    } <= names
    assert report.summary_lines() == [
        f"t.parquet: valid (300 rows, {len(report.checks)} checks, 0 failed, 0 warnings)"
    ]


def test_breast_cancer_passes_in_shipped_order_and_in_each_split(tmp_path: Path) -> None:
    data = DataParams()
    assert validate_table(load_source(data.source), data=data, params=STRICT).success
    for name, path in prepare(data, 0.1, tmp_path).items():
        report = validate_table(read_table(path), data=data, params=STRICT, where=name)
        assert report.success, report.summary_lines()


def test_nan_is_named_with_rows(clean: pd.DataFrame) -> None:
    clean.loc[[4, 17], "x3"] = np.nan
    report = run(clean)
    assert not report.success and failed(report) == {("no_nulls", "x3")}
    assert "FAIL no_nulls column 'x3': 2 null values" in report.summary_lines()[1]
    assert report.summary_lines()[1].endswith("(rows 4, 17)")
    assert run(clean, data=replace(DATA, missing="mask")).success


def test_infinite_values_fail_even_with_mask(clean: pd.DataFrame) -> None:
    clean.loc[7, "x1"] = -np.inf
    for data in (DATA, replace(DATA, missing="mask")):
        report = run(clean, data=data)
        assert failed(report) == {("finite", "x1")}
        assert report.failures()[0].rows == (7,)


def test_a_text_column_is_categorical_unless_it_names_each_row(clean: pd.DataFrame) -> None:
    report = run(clean.assign(site=["a", "b", "c"] * 100))
    assert report.success
    assert any(c.name == "categorical" and c.column == "site" and "3 levels" in c.message for c in report.checks)
    named = run(clean.assign(site=[f"s{i}" for i in range(300)]))
    assert failed(named) == {("categorical", "site")}
    assert "300 distinct values in 300 rows: an identifier" in named.failures()[0].message
    assert run(clean.assign(site="a"), data=DataParams(id_columns=("sample_id", "site"))).success
    assert run(clean.assign(site=[f"s{i}" for i in range(300)]), data=DataParams(id_columns=("sample_id",), drop_columns=("site",))).success


def test_constant_column_fails(clean: pd.DataFrame) -> None:
    report = run(clean.assign(x2=3.0))
    assert ("not_constant", "x2") in failed(report)


def test_heavy_duplication_fails_with_rows(clean: pd.DataFrame) -> None:
    features = clean.drop(columns="sample_id")
    dup = pd.concat([features, features.iloc[:60]], ignore_index=True)  # 60 of 360 repeat
    dup = dup.sample(frac=1.0, random_state=0, ignore_index=True)
    dup.insert(0, "sample_id", [f"s{i}" for i in range(len(dup))])
    report = run(dup)
    assert failed(report) == {("duplicates", None)}
    check = report.failures()[0]
    assert "60 of 360 rows" in check.message and len(check.rows) == 5
    first = dup.drop(columns="sample_id").duplicated(keep="first")
    assert all(first.iloc[r] for r in check.rows)
    assert run(dup, params=replace(STRICT, max_duplicate_fraction=0.2)).success


def test_trend_fails_warns_or_is_skipped_by_policy(clean: pd.DataFrame) -> None:
    ordered = clean.sort_values("x1", ignore_index=True)
    strict = run(ordered)
    assert not strict.success
    assert {("trend", "x1"), ("autocorrelation", "x1"), ("shift", "x1")} <= failed(strict)
    warn = run(ordered, params=replace(STRICT, iid="warn"))
    assert warn.success and not warn.failures()
    assert ("trend", "x1") in {(c.name, c.column) for c in warn.warnings()}
    assert any(line.startswith("WARN trend column 'x1'") for line in warn.summary_lines())
    off = run(ordered, params=replace(STRICT, iid="off"))
    assert off.success and not {c.name for c in off.checks} & {"trend", "autocorrelation", "shift"}


def test_autocorrelation_message_says_what_was_found(clean: pd.DataFrame) -> None:
    """Negative lag-1 autocorrelation (a high row, then a low one) is called alternating, positive
    autocorrelation (runs of alike rows) alike: the message names what the rows do."""
    x = clean["x1"].to_numpy()
    alternating = clean.assign(x1=np.where(np.arange(len(x)) % 2, np.abs(x), -np.abs(x)))
    runs = clean.assign(x1=np.repeat(x[: len(x) // 3], 3))
    neg = next(c for c in run(alternating).failures() if (c.name, c.column) == ("autocorrelation", "x1"))
    pos = next(c for c in run(runs).failures() if (c.name, c.column) == ("autocorrelation", "x1"))
    assert "alternate" in neg.message and "alike" not in neg.message, neg.message
    assert "alike" in pos.message and "alternate" not in pos.message, pos.message


def test_step_between_halves_fails(clean: pd.DataFrame) -> None:
    clean.loc[150:, "x2"] += 1.5  # a recalibration half way
    assert ("shift", "x2") in failed(run(clean))


def test_small_iid_tables_do_not_trip_the_iid_checks() -> None:
    rng = np.random.default_rng(0)
    for n in (12, 30, 60, 200):
        for _ in range(20):
            x = rng.normal(size=n)
            stats = iid_stats(x)
            p = STRICT
            limits = {
                "autocorrelation": p.max_autocorrelation,
                "trend": p.max_trend_correlation,
                "shift": p.max_shift_std,
            }
            assert not any(abs(s.value) > limits[s.name] and s.p_value < p.iid_alpha for s in stats)
    assert iid_stats(np.ones(50)) == [] and iid_stats(np.arange(5.0)) == []


def test_too_few_rows_fail(clean: pd.DataFrame) -> None:
    report = run(clean.iloc[:5])
    assert failed(report) == {("row_count", None)}
    assert "5 rows; at least 10 are needed (validate.min_rows)" in report.failures()[0].message


def test_missing_id_column_is_reported(clean: pd.DataFrame) -> None:
    report = run(clean.drop(columns="sample_id"))
    assert failed(report) == {("columns", None)}
    assert report.failures()[0].message == "missing columns 'sample_id'"


@pytest.fixture
def schema(clean: pd.DataFrame) -> Schema:
    return Schema.from_frame(clean, ["sample_id"])


def test_against_schema_names_missing_and_extra_columns(
    clean: pd.DataFrame, schema: Schema
) -> None:
    new = clean.drop(columns=["x1", "x3"]).assign(zz=1.0)
    report = run(new, against=schema)
    assert failed(report) == {("columns", None)}
    assert report.failures()[0].message == "missing columns 'x1', 'x3'; extra columns 'zz'"


def test_against_schema_accepts_another_order(clean: pd.DataFrame, schema: Schema) -> None:
    assert run(clean[["x3", "sample_id", "x0", "x4", "x2", "x1"]], against=schema).success


def test_against_schema_reports_out_of_range_rows(clean: pd.DataFrame, schema: Schema) -> None:
    lo, hi = schema.widened_range(STRICT.range_tolerance)[2]
    clean.loc[[3, 250], "x2"] = [hi + 1.0, lo - 1.0]
    clean.loc[9, "x2"] = hi - 1e-9  # inside the widened range: fine
    lenient = run(clean, against=schema)  # 2 of 300 values: within max_out_of_range_fraction 1%
    [range_check] = [c for c in lenient.checks if c.name == "in_training_range" and c.column == "x2"]
    assert lenient.success and range_check.message.startswith("2 values (0.67%) outside the training range")
    report = run(clean, against=schema, params=replace(STRICT, max_out_of_range_fraction=0.005))
    assert failed(report) == {("in_training_range", "x2")}
    check = report.failures()[0]
    assert check.rows == (3, 250) and "at most 0.50% allowed (validate.max_out_of_range_fraction)" in check.message


def test_validate_path_writes_a_json_report(tmp_path: Path, clean: pd.DataFrame) -> None:
    path = write_table_atomic(
        clean.assign(x1=np.where(np.arange(300) == 8, np.nan, clean["x1"])), tmp_path / "t.csv"
    )
    params = Params(data=DATA)
    report = validate_path(path, params, report_path=tmp_path / "reports" / "validate.json")
    saved = json.loads((tmp_path / "reports" / "validate.json").read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert saved["success"] is False and saved["where"] == str(path) and saved["n_failed"] == 1
    [bad] = [c for c in saved["checks"] if not c["success"]]
    assert (bad["name"], bad["column"], bad["rows"]) == ("no_nulls", "x1", [8])


def test_validate_path_unreadable_file_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(PipelineError, match=r"t\.parquet is not a readable Parquet table") as err:
        validate_path(path, Params())
    assert err.value.exit_code == 2


def _ar1(n: int, phi: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    e = rng.normal(size=n)
    x = np.empty(n)
    x[0] = e[0]
    for t in range(1, n):
        x[t] = phi * x[t - 1] + e[t]
    return x


def test_the_iid_tests_are_corrected_for_the_number_of_columns():
    """Bonferroni: one column's lag-1 autocorrelation of +0.55 at p = 2.0e-5 is significant on its own
    (iid_alpha 1e-4) but not among ten columns (1e-4 / 10); removing the correction failed nothing before."""
    column = _ar1(56, 0.6, seed=312)  # +0.552, p 2.0e-5; its trend and shift are small
    (r1,) = [s for s in iid_stats(column) if s.name == "autocorrelation"]
    assert r1.value > 0.55 and 1e-5 < r1.p_value < 1e-4
    data = DataParams(id_columns=())
    params = ValidateParams(iid="fail")
    alone = validate_table(pd.DataFrame({"a": column}), data=data, params=params)
    assert [(c.name, c.column) for c in alone.failures()] == [("autocorrelation", "a")]
    rng = np.random.default_rng(0)
    wide = pd.DataFrame({"a": column} | {f"b{j}": rng.normal(size=56) for j in range(9)})
    assert validate_table(wide, data=data, params=params).success
