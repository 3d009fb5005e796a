"""The anomaly flag of `embed`: new rows from the training distribution are flagged at about
embed.anomaly_quantile, on real tables, whatever cells are missing."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_diabetes, load_wine

from pipeline.config import load_params
from pipeline.contract.model import load_model_dir
from pipeline.io.sources import synthetic_table
from pipeline.io.tables import write_table_atomic
from pipeline.stages.embed import embed_file, embed_frame
from pipeline.stages.prepare import prepare
from pipeline.stages.train import train_model
from vae import anomaly_threshold, load_checkpoint, score_rows
from vae.calibration import MissingAdjustment
from vae.train import held_out_rows

QUANTILE = 0.1  # enough test rows below it (about 23 of 228) for a rate to say something
# the default model (it overfits a small table: training rows score nats above new ones), a larger
# test split and validation share than the defaults: more rows to place and to check the rate with
CALIBRATION = [f"embed.anomaly_quantile={QUANTILE}", "data.test_fraction=0.4", "train.val_fraction=0.3",
               "train.num_threads=1"]


def _train(tmp: Path, sets: list[str], *, with_val: bool = True,
           blank: float = 0.0) -> tuple[dict[str, Path], Path]:
    """prepare + train; blank: the share of train and val cells set missing, at random."""
    params = load_params(None, sets)
    paths = prepare(params.data, params.train.val_fraction, tmp / "prepared")
    rng = np.random.default_rng(params.data.seed)
    for name in ("train", "val") if blank else ():
        df = pd.read_parquet(paths[name])
        df.mask(rng.random(df.shape) < blank).to_parquet(paths[name])
    train_model(paths["train"], tmp / "model", params, val_path=paths["val"] if with_val else None)
    return paths, tmp / "model"


def test_new_rows_are_flagged_at_the_configured_rate(tmp_path: Path) -> None:
    """breast_cancer's held-out test rows, three splits (two with a --val table, one with the
    validation rows fit() holds out of DATA), train.refit on: the share flagged is within half and
    twice embed.anomaly_quantile. Placed on training rows (before), 25 % of test rows were flagged
    at 0.1 with the default split."""
    flagged = rows = 0
    for seed in (0, 1, 2):
        paths, model_dir = _train(tmp_path / str(seed), [*CALIBRATION, "data.source=sklearn:breast_cancer",
                                                         f"data.seed={seed}"], with_val=seed < 2)
        model = load_model_dir(model_dir)
        test = pd.read_parquet(paths["test"])
        out = embed_frame(model, test, load_params(None, CALIBRATION).embed)
        flagged, rows = flagged + int(out["anomaly"].sum()), rows + len(out)
        record = model.metadata["anomaly"]
        # how the threshold was placed: on which rows, how many, by which model, quantile and K
        assert record["placed_on"] == "calibration rows (held out from the selection fit)"
        assert record["scored_by"] == "selected model (before train.refit)"
        assert record["rows"] == record["calibration"]["rows"] == round(len(pd.read_parquet(paths["train"])) * 0.2)
        assert (record["quantile"], record["score_samples"]) == (QUANTILE, 100)
    assert QUANTILE / 2 <= flagged / rows <= 2 * QUANTILE, f"{flagged} of {rows} test rows flagged"


@pytest.mark.slow  # ten trainings with the default settings
def test_new_rows_are_flagged_at_the_default_quantile(tmp_path: Path) -> None:
    """embed.anomaly_quantile 0.01 and every other setting the default (the pipeline's split: a
    --val table, 114 test rows), breast_cancer, ten splits: about 11 flags expected among 1140 test
    rows, and the share flagged is within half and twice 0.01 (measured: 17, 1.5 %). Before, on the
    validation rows that early stopping chose its epoch on, with the plain empirical quantile: 57
    (5.0 %); on 41 calibration rows (train.calibration_fraction 0.1): 39 (3.4 %)."""
    flagged = rows = 0
    for seed in range(10):
        sets = ["data.source=sklearn:breast_cancer", f"data.seed={seed}"]
        paths, model_dir = _train(tmp_path / str(seed), sets)
        model = load_model_dir(model_dir)
        out = embed_frame(model, pd.read_parquet(paths["test"]), load_params(None, sets).embed)
        flagged, rows = flagged + int(out["anomaly"].sum()), rows + len(out)
        assert model.metadata["anomaly"]["placed_on"] == "calibration rows (held out from the selection fit)"
    assert 0.005 <= flagged / rows <= 0.02, f"{flagged} of {rows} test rows flagged"


def selection_of(model_dir: Path):
    """The model early stopping selected, from the run's last checkpoint (its weights before the refit)."""
    model = copy.deepcopy(load_model_dir(model_dir).vae)
    model.load_state_dict(load_checkpoint(model_dir).selected_model)
    return model.eval()


SMALL = ["data.source=sklearn:wine", "train.epochs=3", "model.hidden_dims=[8]", "model.latent_dim=2",
         "embed.score_samples=5", "train.val_fraction=0.2", "train.num_threads=1", "train.refit=true",
         "train.calibration_fraction=0.2"]


@pytest.fixture(scope="module")
def wine_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wine") / "wine.csv"
    load_wine(as_frame=True).data.to_csv(path, index=False)
    return path


def test_calibration_rows_are_kept_from_the_selection_and_the_refit_trains_on_them(tmp_path, wine_csv, monkeypatch):
    """train.calibration_fraction 0.2 of wine's 178 rows: 36 rows, none of them among the rows
    the selection trains on or early stopping chooses on; the refit trains on all 178; the threshold
    is placed on them (recorded), and the baselines saw every row."""
    from pipeline.stages import train

    calls = []
    real_fit = train.fit

    def spy(model, y, cfg, **kw):
        calls.append((y.clone(), kw["y_val"], kw["y_refit_extra"]))
        return real_fit(model, y, cfg, **kw)

    monkeypatch.setattr(train, "fit", spy)
    params = load_params(None, SMALL)
    train_model(wine_csv, tmp_path / "model", params)
    (y_fit, y_val, y_cal), = calls
    assert y_val is None and (y_fit.shape[0], y_cal.shape[0]) == (142, 36)
    rows = {tuple(r) for r in torch.cat([y_fit, y_cal]).tolist()}
    assert len(rows) == 178 and rows == {tuple(r) for r in torch.from_numpy(
        load_wine().data.astype(np.float32)).tolist()}
    validation = {tuple(r) for r in held_out_rows(y_fit, params.train).tolist()}
    assert len(validation) == 28 and not validation & {tuple(r) for r in y_cal.tolist()}
    model = load_model_dir(tmp_path / "model")
    record = model.metadata["anomaly"]
    assert (record["placed_on"], record["rows"], record["scored_by"]) == (
        "calibration rows (held out from the selection fit)", 36, "selected model (before train.refit)")
    assert record["calibration"] == {"fraction": 0.2, "rows": 36}
    assert record["threshold"] == anomaly_threshold(
        score_rows(selection_of(tmp_path / "model"), y_cal, 5, 0, common_eps=True).log_likelihood, 0.01)


@pytest.mark.parametrize(("sets", "why"), [
    (["train.calibration_fraction=0"], "train.calibration_fraction is 0"),
    (["train.calibration_fraction=0.9"], "18 rows would be left, 14 to fit, below 28"),
])
def test_without_calibration_rows_the_threshold_is_placed_on_the_validation_rows(tmp_path, wine_csv, sets, why):
    """No calibration slice where it is off or where it would leave fewer rows to fit than
    2 x (features + 1): the validation rows, as before, and why."""
    train_model(wine_csv, tmp_path / "model", load_params(None, [*SMALL, *sets]))
    record = load_model_dir(tmp_path / "model").metadata["anomaly"]
    assert (record["placed_on"], record["rows"]) == ("validation rows (held out)", round(178 * 0.2))
    assert record["calibration"]["skipped"] == why and record["calibration"]["rows"] == 0


def test_without_a_refit_the_calibration_rows_are_trained_on_by_no_model(tmp_path, wine_csv, monkeypatch):
    """train.refit false, train.calibration_fraction 0.2: the same 36 rows are carved, fit() never
    sees them (no rows for a refit), and the final model, which is the selection, places the threshold."""
    from pipeline.stages import train

    calls = []
    real_fit = train.fit

    def spy(model, y, cfg, **kw):
        calls.append((y.clone(), kw["y_refit_extra"]))
        return real_fit(model, y, cfg, **kw)

    monkeypatch.setattr(train, "fit", spy)
    train_model(wine_csv, tmp_path / "model", load_params(None, [*SMALL, "train.refit=false"]))
    (y_fit, extra), = calls
    assert extra is None and y_fit.shape[0] == 142
    model = load_model_dir(tmp_path / "model")
    record = model.metadata["anomaly"]
    assert (record["placed_on"], record["rows"], record["scored_by"]) == (
        "calibration rows (held out from the selection fit)", 36, "final model")
    carved = {tuple(r) for r in torch.from_numpy(load_wine().data.astype(np.float32)).tolist()} - {
        tuple(r) for r in y_fit.tolist()}
    cal = torch.tensor(sorted(carved))
    assert len(carved) == 36
    assert record["threshold"] == pytest.approx(anomaly_threshold(
        score_rows(model.vae, cal, 5, 0, common_eps=True).log_likelihood, 0.01), rel=1e-5)


@pytest.mark.parametrize("limit", [178, 179])
def test_a_large_table_holds_out_capped_rows_and_refits_below_the_auto_limit(tmp_path, wine_csv, monkeypatch, limit):
    """train.val_max_rows and train.calibration_max_rows cap the held-out rows; train.refit auto
    refits tables of fewer than vae.train.REFIT_AUTO_ROWS rows (10,000; here wine's 178 rows are
    the limit, or one below it), counting the calibration rows that only a refit trains on."""
    import vae.train
    from pipeline.stages import train

    calls = []
    real_fit = train.fit

    def spy(model, y, cfg, **kw):
        calls.append((y.shape[0], cfg.refit, kw["y_refit_extra"]))
        return real_fit(model, y, cfg, **kw)

    monkeypatch.setattr(train, "fit", spy)
    monkeypatch.setattr(vae.train, "REFIT_AUTO_ROWS", limit)
    splits: list[int] = []
    real_split = vae.train._split

    def split_spy(n, cfg):
        fitted, held = real_split(n, cfg)
        splits.append(len(held))
        return fitted, held

    monkeypatch.setattr(vae.train, "_split", split_spy)
    # the refit runs the selection's chosen epochs, so one must beat the start: 3 epochs of 3 steps (batches
    # of 64) at the full lr do; within the lr's warm-up, averaged over train.ema_steps, or as 3 steps of one
    # 161-row batch they did not, and a refit of 0 epochs leaves no refit epoch to check
    params = load_params(None, [*SMALL, "train.refit=auto", "train.calibration_max_rows=10", "train.val_max_rows=7",
                                "train.ema_steps=0", "train.lr_warmup_steps=0", "train.batch_size=64"])
    train_model(wine_csv, tmp_path / "model", params)
    (fit_rows, refit, extra), = calls
    assert fit_rows == 168 and refit is (limit > 178) and (extra is None) is (limit == 178)
    assert held_out_rows(torch.zeros(fit_rows, 13), params.train).shape[0] == 7  # not 0.2 x 168
    assert splits[0] == 7  # what fit() held out for early stopping
    model = load_model_dir(tmp_path / "model")
    record = model.metadata["anomaly"]
    assert record["calibration"] == {"fraction": 0.2, "rows": 10} and record["rows"] == 10
    assert record["scored_by"] == ("selected model (before train.refit)" if refit else "final model")
    assert any(h["phase"] == "refit" for h in load_checkpoint(tmp_path / "model").history) is refit


def test_without_held_out_rows_the_threshold_is_placed_on_training_rows_with_a_warning(tmp_path, caplog):
    sets = ["data.source=sklearn:wine", "train.val_fraction=0", "train.calibration_fraction=0", "train.epochs=3",
            "model.hidden_dims=[8]",
            "model.latent_dim=2", "embed.score_samples=5"]
    params = load_params(None, sets)
    table = tmp_path / "wine.csv"
    load_wine(as_frame=True).data.to_csv(table, index=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.train"):
        train_model(table, tmp_path / "model", params)
    assert "no rows held out" in caplog.text
    record = load_model_dir(tmp_path / "model").metadata["anomaly"]
    assert (record["placed_on"], record["rows"]) == ("training rows", 178)


@pytest.fixture(scope="module")
def diabetes_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sklearn's diabetes table in its recorded units (age in years, s1 in mg/dl): a cell's density
    there is well below 1, so before, a row with missing cells scored higher and was never flagged."""
    path = tmp_path_factory.mktemp("diabetes") / "diabetes.csv"
    load_diabetes(scaled=False, as_frame=True).data.astype("float64").to_csv(path, index=False)
    return path


def test_with_missing_cells_rows_are_flagged_at_the_configured_rate_for_each_count(tmp_path, diabetes_csv):
    """data.missing: mask, 5 % of the training and validation cells missing at random. The held-out
    test rows with k = 0..3 cells blanked at random: for each k, the share flagged is within half and
    twice embed.anomaly_quantile (three splits pooled). Before, it fell with k: 0.028 of the rows with
    3 cells missing; log_likelihood is still the IWAE log p(y_obs), and anomaly_pvalue is in [0, 1]."""
    rng = np.random.default_rng(7)
    flagged, rows = np.zeros(4), 0
    for seed in (0, 1, 2):
        sets = [*CALIBRATION, f"data.source={diabetes_csv}", "data.missing=mask", f"data.seed={seed}"]
        paths, model_dir = _train(tmp_path / str(seed), sets, blank=0.05)
        model = load_model_dir(model_dir)
        test = pd.read_parquet(paths["test"])
        rows += len(test)
        for k in range(4):
            cells = test.to_numpy(copy=True)
            for row in cells:
                row[rng.choice(cells.shape[1], k, replace=False)] = np.nan
            out = embed_frame(model, pd.DataFrame(cells, columns=test.columns), load_params(None, sets).embed)
            flagged[k] += out["anomaly"].sum()
            assert out["anomaly_pvalue"].between(0, 1).all()
            assert list(out.columns[-3:]) == ["log_likelihood", "anomaly_pvalue", "anomaly"]
            if k == 2 and seed == 0:  # the column is what it was: IWAE log p(y_obs), common draws
                ll = score_rows(model.vae, torch.from_numpy(cells.astype(np.float32)), 100, 0, common_eps=True)
                np.testing.assert_allclose(out["log_likelihood"], ll.log_likelihood.numpy(), rtol=1e-6)
    rates = flagged / rows
    assert ((rates >= QUANTILE / 2) & (rates <= 2 * QUANTILE)).all(), f"share flagged with k = 0..3 missing: {rates}"


def test_missing_adjustment_by_hand():
    """s = (log p(y_O) - m(O)) / |O|^power, m(O) = a + sum_{j in O} b_j; the p-value is the share of
    the reference at or below s."""
    adj = MissingAdjustment(mean=(1.0, 2.0, -3.0), spread_power=0.5, reference=(-2.0, -1.0, 0.0, 1.0))
    observed = torch.tensor([[True, True], [True, False], [False, True]])
    ll = torch.tensor([0.0, 5.0, 1.0], dtype=torch.float64)
    np.testing.assert_allclose(adj.adjusted(ll, observed).numpy(), [(0.0 - 0.0) / 2**0.5, 5.0 - 3.0, 1.0 + 2.0])
    np.testing.assert_allclose(adj.pvalue(torch.tensor([-3.0, -1.0, 0.5, 9.0])).numpy(), [0.0, 0.5, 0.75, 1.0])
    assert MissingAdjustment.from_dict(adj.to_dict()) == adj


def test_a_masked_model_streams_anomaly_pvalue_batch_by_batch_as_one_call(tmp_path: Path) -> None:
    """embed_file in batches of 100 rows writes the frame of one call (log_likelihood to float64
    rounding): a row's p-value and flag do not depend on its batch; rows with 1 and with 3 missing cells both get p-values spread over (0, 1]."""
    rng = np.random.default_rng(0)
    table = synthetic_table(400, 5, seed=1)
    features = [f"x{j}" for j in range(5)]
    table[features] = table[features].mask(rng.random((400, 5)) < 0.1)
    sets = ["data.id_columns=[row_id]", "data.missing=mask", "model.latent_dim=2", "model.hidden_dims=[16]",
            "train.epochs=3", "train.num_threads=1", "embed.score_samples=10", "embed.batch_rows=100"]
    params = load_params(None, sets)
    model = load_model_dir(train_model(write_table_atomic(table, tmp_path / "train.parquet"), tmp_path / "model",
                                       params).directory)
    new = synthetic_table(450, 5, seed=2)
    cells = new[features].to_numpy(copy=True)
    for i, row in enumerate(cells):
        row[rng.choice(5, 1 + 2 * (i % 2), replace=False)] = np.nan
    new[features] = cells
    new.to_parquet(tmp_path / "new.parquet", index=False)
    assert embed_file(model, tmp_path / "new.parquet", tmp_path / "out.parquet", params.embed) == 450
    got = pd.read_parquet(tmp_path / "out.parquet")
    whole = embed_frame(model, new, params.embed)
    pd.testing.assert_frame_equal(got, whole, check_exact=False, rtol=1e-12)  # log_likelihood: float64 rounding
    assert got[["anomaly_pvalue", "anomaly"]].equals(whole[["anomaly_pvalue", "anomaly"]])
    assert list(got.columns) == ["row_id", "z_0", "z_1", "log_likelihood", "anomaly_pvalue", "anomaly"]
    assert got["anomaly"].equals(got["anomaly_pvalue"] < params.embed.anomaly_quantile)
    for k in (1, 3):
        p = got["anomaly_pvalue"][new[features].isna().sum(axis=1) == k]
        assert 0.2 < p.median() < 0.8 and p.min() < 0.2 and p.max() > 0.8
