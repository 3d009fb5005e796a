"""Samples stay in the data's support: log-scale columns, grid columns (CLI end to end)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.contract.model import load_model_dir
from tests.pipeline.helpers import FAST_ARGS, run

ARGS = [*FAST_ARGS, "--set", "model.log_columns=auto"]


def measurements(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Skewed positive areas (log-normal, like breast_cancer's), a model year of two values and
    integer cylinders: the Gaussian of y puts mass below 0, between the years and between counts."""
    rng = np.random.default_rng(seed)
    size = rng.normal(size=n)
    return pd.DataFrame({
        "sample_id": np.arange(n),
        "area": np.exp(6.3 + 0.5 * size + 0.1 * rng.normal(size=n)),
        "perimeter": np.exp(4.4 + 0.25 * size + 0.05 * rng.normal(size=n)),
        "year": rng.choice([1999, 2008], n),
        "cyl": np.where(size < -0.5, 4, np.where(size < 0.7, 6, 8)) + (rng.random(n) < 0.05),
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("support")
    measurements().to_parquet(root / "train.parquet", index=False)
    assert main(["train", str(root / "train.parquet"), "--out", str(root / "model"), *ARGS]) == 0
    return root


def test_auto_models_the_skewed_columns_on_the_log_scale(trained):
    spec = load_model_dir(trained / "model").vae.spec
    assert spec.log[:2] == (True, True)
    assert spec.support[2] == (1999.0, 2008.0)


def test_samples_stay_on_the_support(trained, tmp_path, capsys):
    code, _, err = run(capsys, "sample", str(trained / "model"), "1000", str(tmp_path / "s.parquet"), *ARGS)
    assert code == 0, err
    s = pd.read_parquet(tmp_path / "s.parquet")
    assert (s["area"] > 0).all() and (s["perimeter"] > 0).all()
    assert set(s["year"]) == {1999, 2008}
    assert set(s["cyl"]) <= {4, 5, 6, 7, 8, 9} and set(s["cyl"]) <= set(measurements()["cyl"])


def test_evaluate_reports_nats_in_the_tables_units(trained, tmp_path, capsys):
    measurements(200, seed=3).to_parquet(tmp_path / "test.parquet", index=False)
    code, out, err = run(capsys, "evaluate", str(trained / "model"), str(tmp_path / "test.parquet"), *ARGS)
    assert code == 0, err
    metrics = json.loads(out)
    # the log scale fits log-normal columns far better than any Gaussian of y in the same units
    assert metrics["log_likelihood"] > metrics["baselines"]["full_gauss"] + 0.5, metrics


def test_a_non_positive_value_in_a_log_column_is_named(trained, tmp_path, capsys):
    bad = measurements(30, seed=4)
    bad.loc[9, "area"] = 0.0
    bad.to_parquet(tmp_path / "bad.parquet", index=False)
    code, _, err = run(capsys, "embed", str(trained / "model"), str(tmp_path / "bad.parquet"),
                       str(tmp_path / "e.parquet"), *ARGS)
    assert code == 2 and "column 'area' row 9 holds 0.0; the model takes its log (model.log_columns)" in err


@pytest.mark.parametrize(("value", "says"), [
    ("5", "model.log_columns is 5; choose auto, none or a list of column names"),
    ("[year, nope]", "model.log_columns names 'nope', which is not a feature column"),
])
def test_bad_log_columns_are_named(tmp_path, capsys, value, says):
    measurements(100).to_parquet(tmp_path / "t.parquet", index=False)
    code, _, err = run(capsys, "train", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "m"), *FAST_ARGS,
                       "--set", f"model.log_columns={value}")
    assert code == 2 and says in err, err
    assert not (tmp_path / "m").exists()


def test_a_listed_log_column_with_a_zero_is_named(tmp_path, capsys):
    table = measurements(100)
    table.loc[12, "area"] = 0.0
    table.to_parquet(tmp_path / "t.parquet", index=False)
    code, _, err = run(capsys, "train", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "m"), *FAST_ARGS,
                       "--set", "model.log_columns=[area]")
    assert code == 2 and "column 'area' row 12 holds 0.0; model.log_columns needs values > 0" in err, err
    code, _, err = run(capsys, "train", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "m"), *ARGS)
    assert code == 0, err  # auto leaves that column as it is
    assert not load_model_dir(tmp_path / "m").vae.spec.is_log(0)
