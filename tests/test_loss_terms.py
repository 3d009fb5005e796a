"""vae.terms.TERMS is the one list of the ELBO's terms: the epoch sums, EpochStats, history.csv,
the MLflow curves, the loss-curve panels, the progress lines, dvc.yaml's plots and the metrics JSON
each name every term, in its order. A term added in one place and missing in another fails here."""

from __future__ import annotations

import io
import json
from dataclasses import fields
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import vae
from pipeline.cli import main
from pipeline.orchestration.progress import TrainingProgress, epoch_line
from pipeline.registry import plots, register
from tests.pipeline.helpers import FAST_ARGS, clean_table
from vae.adam import FlatAdam
from vae.step import SUMMED, StepRunner
from vae.terms import SPLITS, TERMS, VAL_LOG_LIKELIHOOD, column, history_columns, split_values

ROOT = Path(__file__).resolve().parents[1]
NAMES = [t.name for t in TERMS]
COLUMNS = [column(split, t) for split in SPLITS for t in TERMS]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A model directory from `vaepipe train` (a few epochs) and its metrics JSON from `vaepipe evaluate`."""
    root = tmp_path_factory.mktemp("terms")
    table = root / "train.parquet"
    clean_table(n=200).to_parquet(table, index=False)
    model = root / "model"
    assert main(["train", str(table), "--out", str(model), *FAST_ARGS, "--set", "train.epochs=3"]) == 0
    assert main(["evaluate", str(model), str(table), "--json", str(root / "m.json"), *FAST_ARGS]) == 0
    return model, json.loads((root / "m.json").read_text())


def _stats(**over: object) -> vae.EpochStats:
    terms = vae.LossTerms(recon=torch.tensor(-4.0, dtype=torch.float64), kl=torch.tensor(1.0, dtype=torch.float64))
    values = {**split_values("train", terms), **split_values("val", terms)}
    return vae.EpochStats(**{"epoch": 2, "step": 2, "beta": 1.0, "lr": 1e-3, **values, "seconds": 0.1,
                             "stage_epochs": 10, **over})


def test_every_term_is_a_loss_and_score_attribute_and_an_evaluation_field() -> None:
    """LossTerms' fields are what the step sums (the ELBO is their difference); each term reads off
    LossTerms and RowScores by name, and summarize writes it under its metrics JSON key."""
    assert len(set(NAMES)) == len(NAMES) and len({t.key for t in TERMS}) == len(TERMS)
    assert set(SUMMED) <= set(NAMES) and "elbo" in NAMES
    t = vae.LossTerms(recon=torch.tensor([-4.0]), kl=torch.tensor([1.0]))
    assert {name: float(getattr(t, name)) for name in NAMES} == {"elbo": -5.0, "recon": -4.0, "kl": 1.0}
    row_fields = {f.name for f in fields(vae.RowScores)}
    assert all(name in row_fields or isinstance(getattr(vae.RowScores, name, None), property) for name in NAMES)
    assert [f.name for f in fields(vae.Evaluation) if f.name in {t.key for t in TERMS}] == [t.key for t in TERMS]


def test_the_steps_sums_hold_each_summed_term_by_name_then_the_finite_check() -> None:
    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)
    model = vae.VAE(vae.describe_table(x), vae.ModelConfig(latent_dim=2, hidden_dims=[4]), seed=0)
    with torch.no_grad():
        before = vae.loss_terms(model, x, None, 1, None, eps=eps)  # the step's terms, before Adam moves
    runner = StepRunner(model, FlatAdam(list(model.parameters()), 1e-3), vae.TrainConfig(batch_size=8, mc_samples=1),
                        torch.device("cpu"), "fp32")
    runner.step(x, None, eps, beta=1.0)
    assert runner.sums.shape == (len(SUMMED) + 1,) and torch.isfinite(runner.sums).all()
    for i, name in enumerate(SUMMED):
        assert float(runner.sums[i]) == pytest.approx(float(getattr(before, name).sum()), rel=1e-6)


def test_epoch_stats_and_history_csv_have_a_column_per_term_and_split(trained) -> None:
    split_fields = [f.name for f in fields(vae.EpochStats) if f.name.startswith(tuple(f"{s}_" for s in SPLITS))]
    assert split_fields == [*COLUMNS, VAL_LOG_LIKELIHOOD] and list(history_columns()) == COLUMNS
    history = pd.read_csv(trained[0] / "history.csv")
    assert list(history.columns) == ["total_epoch", "epoch", "step", "beta", "lr", *COLUMNS, VAL_LOG_LIKELIHOOD,
                                     "phase"]
    # IWAE: at least the mean log weight of the same draws (Jensen), the ELBO the val columns report
    assert (history[VAL_LOG_LIKELIHOOD] >= history["val_elbo"] - 1e-4).all()
    assert history["train_elbo"].tolist() == pytest.approx((history["train_recon"] - history["train_kl"]).tolist())


def test_mlflow_curves_are_the_history_columns(trained) -> None:
    assert (*COLUMNS, VAL_LOG_LIKELIHOOD, *register.SCHEDULES) == register.HISTORY_METRICS
    history = pd.read_csv(trained[0] / "history.csv")
    keys = {m.key.removeprefix("refit_") for m in register._history_metrics(history)}
    assert {*COLUMNS, VAL_LOG_LIKELIHOOD} <= keys


def test_the_metrics_json_has_each_terms_key_in_order(trained) -> None:
    metrics = trained[1]
    keys = [t.key for t in TERMS]
    assert keys == ["elbo", "reconstruction", "kl"]  # the metrics JSON's contract
    assert list(metrics)[1 : 1 + len(keys)] == keys
    assert metrics["elbo"] == pytest.approx(metrics["reconstruction"] - metrics["kl"])


def test_the_loss_curves_have_a_panel_per_term(trained) -> None:
    history = pd.read_csv(trained[0] / "history.csv")
    fig = plots.loss_figure(history)
    assert [ax.get_title() for ax in fig.axes] == [t.title for t in TERMS]
    assert all(ax.get_lines() for ax in fig.axes)  # every panel drew its term's curves
    fig.savefig(io.BytesIO(), format="png")


def test_progress_lines_name_the_terms() -> None:
    line = epoch_line(_stats(), 10)
    assert line == "epoch 2/10  ELBO -5.000  recon -4.000  KL 1.000  val ELBO -5.000"
    assert all(f" {t.label} " in line for t in TERMS)
    lines: list[str] = []
    TrainingProgress(lines.append, clock=lambda: 0.0)(_stats())
    assert [t.label for t in TERMS if f" {t.label} " in lines[0]] == [t.label for t in TERMS if t.headline]


def test_dvc_plots_chart_each_headline_term_from_the_history_columns() -> None:
    dvc_plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    charted = {name: spec["y"]["reports/history.csv"] for plot in dvc_plots for name, spec in plot.items()}
    assert charted == {f"{t.label} per epoch": [column(s, t) for s in SPLITS] for t in TERMS if t.headline}
