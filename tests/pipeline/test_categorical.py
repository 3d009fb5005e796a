"""A table with text columns end to end: validate, train, evaluate, embed, sample, drift, pyfunc."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from pipeline.cli import main
from pipeline.config import ValidateParams
from pipeline.contract.drift import column_drift
from pipeline.contract.model import load_model_dir
from pipeline.contract.schema import Schema
from pipeline.errors import PipelineError
from tests.pipeline.helpers import FAST_ARGS, run

DRIVES = ("4", "f", "r")
CLASSES = ("compact", "midsize", "suv")
ARGS = [*FAST_ARGS, "--set", "data.drop_columns=[note]"]


def cars(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """ggplot2-mpg-like rows: displacement, cylinders, highway mpg, a drive and a class that
    depend on them, a free-text note (dropped with data.drop_columns) and an id."""
    rng = np.random.default_rng(seed)
    displ = rng.uniform(1.6, 6.5, n).round(2)
    cyl = np.where(displ < 2.6, 4, np.where(displ < 4.2, 6, 8))
    hwy = (40 - 3.5 * displ + rng.normal(0, 1.5, n)).round(1)
    drv = np.where(displ > 4.5, np.where(rng.random(n) < 0.6, "4", "r"), np.where(rng.random(n) < 0.8, "f", "4"))
    cls = np.array(CLASSES)[np.clip((displ / 2.2).astype(int) + rng.integers(-1, 2, n), 0, 2)]
    return pd.DataFrame({
        "sample_id": np.arange(n), "displ": displ, "cyl": cyl, "hwy": hwy,
        "drv": pd.array(drv, dtype="str"), "class": pd.array(cls, dtype="str"),
        "note": [f"car number {i}" for i in range(n)],
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cars")
    cars().to_csv(root / "train.csv", index=False)
    assert main(["train", str(root / "train.csv"), "--out", str(root / "model"), *ARGS]) == 0
    return root


def test_validate_accepts_text_columns_and_refuses_an_identifier(tmp_path, capsys):
    cars().drop(columns="note").to_csv(tmp_path / "t.csv", index=False)
    code, out, err = run(capsys, "validate", str(tmp_path / "t.csv"), *ARGS[:-2])
    assert code == 0, out + err
    code, out, _ = run(capsys, "validate", str(tmp_path / "t.csv"), "--set", "data.id_columns=[sample_id]")
    assert code == 0, out
    cars().to_csv(tmp_path / "n.csv", index=False)  # the free-text note: a distinct value per row
    code, out, _ = run(capsys, "validate", str(tmp_path / "n.csv"), "--set", "data.id_columns=[sample_id]")
    assert code == 1 and "categorical column 'note': 300 distinct values in 300 rows" in out
    assert run(capsys, "validate", str(tmp_path / "n.csv"), *ARGS)[0] == 0  # dropped without editing the file


def test_train_keeps_the_levels_in_the_contract(trained):
    model = load_model_dir(trained / "model")
    s = model.schema
    assert s.features == ("displ", "cyl", "hwy", "drv", "class")
    assert s.levels == ((), (), (), DRIVES, CLASSES)
    assert s.dropped == ("note",)
    assert model.vae.spec.kinds == ("gaussian", "gaussian", "gaussian", "categorical", "categorical")
    assert sum(s.level_counts[3]) == 300
    # the contract's hash covers the levels: another level set is another contract
    body = {k: v for k, v in s.to_dict().items() if k != "hash"}
    other = Schema(**{**body, "levels": [[], [], [], ["4", "f", "x"], list(CLASSES)]})
    assert other.hash != s.hash


def test_evaluate_embed_and_sample_a_table_with_text_columns(trained, tmp_path, capsys):
    test = cars(120, seed=5)
    test.to_parquet(tmp_path / "test.parquet", index=False)
    code, out, err = run(capsys, "evaluate", str(trained / "model"), str(tmp_path / "test.parquet"), *ARGS)
    assert code == 0, err
    metrics = json.loads(out)
    per = metrics["per_feature_reconstruction"]
    assert set(per) == {"displ", "cyl", "hwy", "drv", "class"}
    assert per["drv"] < 0 and per["class"] < 0  # log-probabilities of levels
    assert sum(per.values()) == pytest.approx(metrics["reconstruction"], abs=1e-6)
    assert np.isfinite(metrics["log_likelihood"])
    assert set(metrics["baselines"]) == {"diag_gauss", "full_gauss", "ppca"}

    code, _, err = run(capsys, "embed", str(trained / "model"), str(tmp_path / "test.parquet"),
                       str(tmp_path / "emb.parquet"), *ARGS)
    assert code == 0, err
    emb = pd.read_parquet(tmp_path / "emb.parquet")
    assert len(emb) == 120 and emb["sample_id"].tolist() == list(range(120))
    assert {"z_0", "z_1", "log_likelihood", "anomaly"} <= set(emb.columns)
    assert np.isfinite(emb["log_likelihood"]).all()

    code, _, err = run(capsys, "sample", str(trained / "model"), "2000", str(tmp_path / "s.csv"), *ARGS)
    assert code == 0, err
    drawn = pd.read_csv(tmp_path / "s.csv")
    assert set(drawn["drv"]) <= set(DRIVES) and len(set(drawn["drv"])) == 3
    assert set(drawn["class"]) <= set(CLASSES)
    share = drawn["drv"].value_counts(normalize=True)
    train_share = cars()["drv"].value_counts(normalize=True)
    assert (share - train_share).abs().max() < 0.1, (share, train_share)


def test_an_unseen_level_is_named_by_column_row_and_level(trained, tmp_path, capsys):
    new = cars(50, seed=6)
    new.loc[7, "drv"] = "x"
    new.to_parquet(tmp_path / "new.parquet", index=False)
    code, _, err = run(capsys, "embed", str(trained / "model"), str(tmp_path / "new.parquet"),
                       str(tmp_path / "e.parquet"), *ARGS)
    assert code == 2
    assert "column 'drv' row 7 holds level 'x', not seen in training (3 levels: '4', 'f', 'r')" in err
    assert not (tmp_path / "e.parquet").exists()
    code, out, _ = run(capsys, "validate", str(tmp_path / "new.parquet"), "--against", str(trained / "model"), *ARGS)
    assert code == 1
    assert "FAIL known_levels column 'drv': 1 value (2.00%) not among the 3 training levels: 'x' (rows 7)" in out
    code, _, err = run(capsys, "evaluate", str(trained / "model"), str(tmp_path / "new.parquet"), *ARGS)
    assert code == 2 and "row 7 holds level 'x'" in err


def test_level_frequencies_drift(trained):
    model = load_model_dir(trained / "model")
    params = ValidateParams()
    same = {d.column: d for d in column_drift(model.schema, cars(400, seed=7), params)}
    assert not same["drv"].drifted and same["drv"].levels_tv is not None
    moved = cars(400, seed=7).assign(drv="r")
    drifts = {d.column: d for d in column_drift(model.schema, moved, params)}
    assert drifts["drv"].drifted and drifts["drv"].levels_tv > 0.5
    assert "levels TV" in drifts["drv"].describe() or "total variation" in drifts["drv"].describe()
    assert not drifts["displ"].drifted
    # embed's path: the level counts from the coded cells give the same figures
    from pipeline.contract.drift import DriftStats

    stats = DriftStats(model.schema)
    stats.update(moved, model.features(moved, "t"))
    coded = {d.column: d for d in stats.drifts(params)}
    assert coded["drv"].levels_tv == pytest.approx(drifts["drv"].levels_tv)
    assert coded["displ"].shift_std == pytest.approx(drifts["displ"].shift_std)


def test_pyfunc_predict_embeds_text_columns(trained):
    from pipeline.registry.pyfunc import VAEPyfunc

    wrapped = VAEPyfunc()
    wrapped.load_context(SimpleNamespace(artifacts={"model_dir": str(trained / "model")}))
    out = wrapped.predict(None, cars(40, seed=8))
    assert len(out) == 40 and {"z_0", "log_likelihood"} <= set(out.columns)
    with pytest.raises(MlflowException, match="column 'class' row 3 holds level 'van'"):  # a 400 when served
        wrapped.predict(None, cars(40, seed=8).assign(**{"class": ["compact"] * 3 + ["van"] * 37}))


def test_missing_levels_under_mask(tmp_path, capsys):
    table = cars(300, seed=2)
    table.loc[::10, "drv"] = None
    table.loc[5::10, "hwy"] = np.nan
    table.to_parquet(tmp_path / "holes.parquet", index=False)
    code, _, err = run(capsys, "train", str(tmp_path / "holes.parquet"), "--out", str(tmp_path / "m"), *ARGS)
    assert code == 1 and "no_nulls (drv)" in err and "data.missing: mask" in err
    mask = [*ARGS, "--set", "data.missing=mask"]
    code, _, err = run(capsys, "train", str(tmp_path / "holes.parquet"), "--out", str(tmp_path / "m"), *mask)
    assert code == 0, err
    code, out, err = run(capsys, "evaluate", str(tmp_path / "m"), str(tmp_path / "holes.parquet"), *mask)
    assert code == 0, err
    assert np.isfinite(json.loads(out)["log_likelihood"])
    code, _, err = run(capsys, "sample", str(tmp_path / "m"), "100", str(tmp_path / "s.parquet"), *mask)
    assert code == 0 and pd.read_parquet(tmp_path / "s.parquet")["drv"].notna().all()


def test_drop_columns_names_a_column_the_table_lacks(tmp_path, capsys):
    cars().to_csv(tmp_path / "t.csv", index=False)
    code, _, err = run(capsys, "train", str(tmp_path / "t.csv"), "--out", str(tmp_path / "m"), *FAST_ARGS,
                       "--set", "data.drop_columns=[notes]")
    assert code == 2 and "data.drop_columns names 'notes', which is not a column of the table" in err
    assert not (tmp_path / "m").exists()


def test_a_registered_model_with_text_columns_predicts_through_mlflow(trained, tmp_path, monkeypatch):
    import mlflow

    from pipeline.config import load_params
    from pipeline.registry.register import register_model

    previous = mlflow.get_tracking_uri()
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    try:
        cars(60, seed=9).to_parquet(tmp_path / "t.parquet", index=False)
        params = load_params(None, [*ARGS[1::2], "register.model_name=cars"])
        register_model(trained / "model", params, table=tmp_path / "t.parquet")
        info = mlflow.models.get_model_info("models:/cars@challenger")
        inputs = {c["name"]: c["type"] for c in info.signature.inputs.to_dict()}
        assert inputs["drv"] == "string" and inputs["displ"] == "double"
        out = mlflow.pyfunc.load_model("models:/cars@challenger").predict(cars(60, seed=9).drop(columns="note"))
        assert len(out) == 60 and out["log_likelihood"].notna().all()
    finally:
        mlflow.set_tracking_uri(previous)  # mlflow keeps it in a global too


def test_integer_levels_read_as_floats_still_match(trained):
    """A streamed CSV chunk infers its own dtypes: levels '4' with a gap come as 4.0 and NaN."""
    model = load_model_dir(trained / "model")
    batch = cars(20, seed=10).drop(columns="note")
    batch["drv"] = np.where(np.arange(20) == 3, np.nan, 4.0)
    mask = model.vae.spec.missing == "mask"
    if not mask:
        with pytest.raises(PipelineError, match="'drv' row 3 holds nan"):
            model.features(batch, "chunk")
    y = model.features(batch.assign(drv=4.0), "chunk")
    assert (y[:, 3] == DRIVES.index("4")).all()
