"""What a registered version's MLflow run shows: held-out metrics named for their rows, constants as
params, a run name a user can tell apart, curves over both stages, per-feature bars free of units."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline.config import load_params
from pipeline.contract.model import load_model_dir
from pipeline.io.sources import synthetic_table
from pipeline.io.tables import write_table_atomic
from pipeline.registry import plots
from pipeline.registry.register import held_out, register_model
from pipeline.stages import evaluate
from pipeline.stages.train import train_model
from tests.pipeline.helpers import own_store

SETTINGS = ["data.id_columns=[row_id]", "model.latent_dim=2", "model.hidden_dims=[16]", "train.num_threads=1",
            "train.epochs=30", "train.early_stopping_patience=30", "train.kl_warmup_steps=0",
            "evaluate.iw_samples=20", "embed.score_samples=10"]


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict, object]]:
    root = tmp_path_factory.mktemp("mlflow-run").resolve()
    with own_store(root):
        df = synthetic_table(300, 6, seed=1)
        train = write_table_atomic(df.iloc[:240], root / "train.parquet")
        test = write_table_atomic(df.iloc[240:].reset_index(drop=True), root / "test.parquet")
        params = load_params(None, SETTINGS)
        train_model(train, root / "model", params)
        metrics = evaluate.run(str(root / "model"), test, params)
        yield root / "model", metrics, register_model(root / "model", params, metrics=metrics, table=test)


def test_held_out_metrics_carry_test_names_and_constants_are_params(registered) -> None:
    _, metrics, v = registered
    run = MlflowClient().get_run(v.run_id)
    logged = run.data.metrics
    assert logged["test_log_likelihood"] == pytest.approx(metrics["log_likelihood"])
    assert logged["test_elbo"] == pytest.approx(metrics["elbo"])
    assert logged["test_baseline_full_gauss"] == pytest.approx(metrics["baselines"]["full_gauss"])
    assert logged["test_gain_over_full_gauss"] == pytest.approx(
        metrics["log_likelihood"] - metrics["baselines"]["full_gauss"])
    assert not {"log_likelihood", "elbo", "kl", "iw_samples", "n_rows", "test_iw_samples", "test_n_rows",
                "lr", "beta", "baseline_full_gauss"} & set(logged), sorted(logged)
    assert run.data.params["test.iw_samples"] == "20" and run.data.params["test.n_rows"] == "60"
    assert run.data.params["train.lr"] and run.data.params["train.beta"]  # the constants, as params
    assert re.fullmatch(r"train 240x6 \d{4}-\d\d-\d\d \d\d:\d\d", run.info.run_name), run.info.run_name


def test_an_older_run_s_held_out_names_still_read() -> None:
    assert held_out({"log_likelihood": -3.0}, "log_likelihood") == -3.0  # logged before the prefix
    assert held_out({"test_log_likelihood": -2.0, "log_likelihood": -3.0}, "log_likelihood") == -2.0
    assert held_out({}, "log_likelihood") is None


def test_curves_count_on_through_the_refit_and_mark_the_chosen_epoch(registered) -> None:
    directory, _, v = registered
    client = MlflowClient()
    selection = [m.step for m in client.get_metric_history(v.run_id, "train_elbo")]
    refit = [m.step for m in client.get_metric_history(v.run_id, "refit_train_elbo")]
    assert selection == list(range(1, 31)) and refit == list(range(31, 31 + len(refit))) and refit
    model = load_model_dir(directory)
    history = pd.read_csv(directory / "history.csv")
    fit = model.metadata["fit"]
    rows = history[history["phase"] == "refit"]
    kept = rows.loc[rows["val_log_likelihood"].idxmax(), "total_epoch"]  # the refit keeps its best epoch on the validation rows
    assert fit["chosen_epoch"] == kept and fit["selection_epochs"] == 30
    # model.noise_by_z: the selection opens the noise head halfway (30 // 2), the refit after the same epoch
    assert fit["noise_opened"] in ([15], [15, 30 + 15])
    fig = plots.loss_figure(history, fit)
    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert {"chosen epoch (the model's weights)", "refit on all rows begins", "z-dependent noise opens",
            "best validation epoch of the selection", "refit, all rows"} <= set(labels), labels
    assert len(labels) == len(set(labels)), labels
    for ax in fig.axes:
        xs = [x for line in ax.get_lines() if line.get_label() in ("train", "refit, all rows") for x in line.get_xdata()]
        assert xs == list(range(1, len(history) + 1))  # no zigzag: the refit after the selection
        assert ax.get_xlabel() == "epoch (selection, then refit)" and ax.get_ylabel() == "nats / row"


def test_per_feature_bars_are_nats_beyond_each_column_s_own_fit_whatever_its_units() -> None:
    """A column that the latent explains no better than its own Gaussian scores 0, in any units:
    E log N(y; m, sd^2) over the column's rows is -1/2 log(2 pi e sd^2); a binary column's is -H(p)."""
    sd, p = 0.7, 0.3
    own = -0.5 * math.log(2 * math.pi * math.e * sd**2)
    bern = p * math.log(p) + (1 - p) * math.log(1 - p)
    gains = plots.feature_gains({"a": own + 1.25, "b": own, "c": bern + 0.1},
                                ["a", "b", "c"], ["gaussian", "gaussian", "bernoulli"], [0.0, 5.0, p], [sd, sd, 0.46])
    assert gains == pytest.approx({"a": 1.25, "b": 0.0, "c": 0.1})
    # the same column in units 1000 times smaller: its reconstruction drops by log 1000, its gain does not
    scaled = plots.feature_gains({"a": own + 1.25 - math.log(1000)}, ["a"], ["gaussian"], [0.0], [sd * 1000])
    assert scaled["a"] == pytest.approx(1.25)


def test_summary_reads_a_champion_logged_under_the_older_names(registered) -> None:
    """A version registered before the test_ prefix (bare log_likelihood, no version tag) still shows
    its held-out log-likelihood as @champion."""
    from pipeline.stages.summary import registry_lines

    _, _, v = registered
    client = MlflowClient()
    source = client.get_model_version(v.name, v.version).source
    old = client.create_run(client.get_run(v.run_id).info.experiment_id, run_name="vae")
    client.log_metric(old.info.run_id, "log_likelihood", -3.25)
    client.set_terminated(old.info.run_id)
    mv = client.create_model_version(v.name, source, run_id=old.info.run_id)
    client.set_registered_model_alias(v.name, "champion", mv.version)
    lines = registry_lines(v.name, v.version)
    assert (f"@champion: models:/{v.name}/{mv.version}, held-out log-likelihood -3.250 nats/row when registered"
            in lines), lines
    assert any(line.startswith(f"model: registered as models:/{v.name}/{v.version} (MLflow run 'train 240x6 ")
               for line in lines), lines
