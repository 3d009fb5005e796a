"""What a training flow run tells its user: a few progress lines, and the gate's decision in its
final state, its last log line and its metrics artifact (real flow runs, a real MLflow store).
The first run (`first`, a module fixture) makes the champion that the worse run is compared with,
whichever of the two tests runs first."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.io.sources import synthetic_table
from pipeline.orchestration.flows import training_flow
from pipeline.orchestration.progress import TrainingProgress
from tests.pipeline.helpers import FAST, LogRecords, own_store
from vae import EpochStats


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("flow-reports").resolve()
    with own_store(root):
        yield root


@contextmanager
def task_log() -> Iterator[list[logging.LogRecord]]:
    """The INFO lines of the flow's and its tasks' run loggers while the block runs."""
    handler, loggers = LogRecords(), [logging.getLogger(n) for n in ("prefect.task_runs", "prefect.flow_runs")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    try:
        yield handler.records
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


def _run(store: Path, name: str, rows: int, seed: int, *extra: str):
    synthetic_table(rows, 6, seed=seed).to_parquet(store / f"{name}.parquet", index=False)
    overrides = [*FAST, f"data.source={store / name}.parquet", "data.id_columns=[row_id]", "data.test_fraction=0.5",
                 *extra]
    return training_flow(overrides=overrides, out=str(store / "models" / name), return_state=True)


@dataclass(frozen=True)
class FirstRun:
    state: Any  # the flow run's final state
    records: list[logging.LogRecord]  # its run loggers' lines
    artifact: Any  # the "metrics" artifact just after it


@pytest.fixture(scope="module")
def first(prefect_harness, store) -> FirstRun:
    """The first run of the store: 400 rows, 60 selection epochs; version 1 becomes the champion."""
    from prefect.artifacts import Artifact

    with task_log() as records:
        state = _run(store, "good", 400, 1, "train.epochs=60", "train.early_stopping_patience=60")
    return FirstRun(state, records, Artifact.get("metrics"))


def test_first_run_says_it_promoted_v1_and_logs_a_few_progress_lines(first: FirstRun) -> None:
    state = first.state
    assert state.is_completed() and state.name == "Promoted v1", state
    assert re.fullmatch(r"promoted v1, the first champion \(-?\d+\.\d{3} nats/row held out\)", state.message), state.message
    assert state.result()["decision"] == state.message
    lines = [r.getMessage() for r in first.records if r.name == "prefect.task_runs"]
    epochs = [line for line in lines if re.match(r"(refit on all rows, )?epoch \d+/\d+ ", line)]
    refit = sum(line.startswith("refit on all rows, epoch") for line in epochs)
    # 60 selection epochs and a refit: every 10 % of a stage (or 30 s), its first and last epoch
    assert 4 <= len(epochs) - refit <= 12 and 2 <= refit <= 12, "\n".join(epochs)
    assert epochs[0].startswith("epoch 1/60 ") and "elapsed" in epochs[0] and "left in this stage" in epochs[0]
    assert any(line.startswith("selection over after") and "refit on all rows" in line for line in lines), lines
    assert "refit done" in epochs[-1]
    flow_lines = [r.getMessage() for r in first.records if r.name == "prefect.flow_runs"]
    assert state.message in flow_lines  # the decision, streamed by `prefect deployment run --watch`

    artifact = first.artifact
    assert artifact is not None and "challenger v1" in str(artifact.data)
    assert artifact.description.startswith(state.message)


def test_a_worse_run_says_it_was_refused_and_which_version_stays(prefect_harness, store, first: FirstRun) -> None:
    state = _run(store, "small", 40, 3)  # 20 rows to fit 6 columns: a worse model on its own test rows
    assert state.is_completed() and state.name == "Champion kept v1", state
    found = re.fullmatch(r"refused: v2 scores (-?\d+\.\d{3}) nats/row held out, not above v1's (-?\d+\.\d{3}); "
                         r"@champion stays v1", state.message)
    assert found and float(found[1]) <= float(found[2]), state.message

    from prefect.artifacts import Artifact

    artifact = Artifact.get("metrics")
    assert artifact is not None and {"challenger v2", "champion v1"} <= set(str(artifact.data).replace('"', "'")
                                                                           .split("'"))
    assert artifact.description.startswith("refused: v2")


def _stats(epoch: int, phase: str, stage: int, *, over: bool = False, opened: bool = False) -> EpochStats:
    return EpochStats(epoch=epoch, step=epoch, beta=1.0, lr=1e-3, train_elbo=-5.0, train_recon=-4.0, train_kl=1.0,
                      val_elbo=-5.5, val_recon=None, val_kl=None, seconds=0.2, phase=phase, stage_epochs=stage,
                      noise_opened=opened, stage_over=over)


def test_progress_lines_a_long_run_with_both_stages_in_a_few_lines() -> None:
    """650 epochs of 0.2 s (early stopping at 345 of 800, the noise head opening at 200, a 300-epoch
    refit): a line every 10 % of a stage or 30 s, the stage switches, and the time left."""
    now = [0.0]
    lines: list[str] = []
    progress = TrainingProgress(lines.append, clock=lambda: now[0])
    for e in range(1, 346):
        now[0] += 0.2
        progress(_stats(e, "select", 800, over=e == 345, opened=e == 200))
    for e in range(1, 301):
        now[0] += 0.2
        progress(_stats(e, "refit", 300, over=e == 300))
    assert len(lines) <= 30, "\n".join(lines)
    assert lines[0] == "epoch 1/800  ELBO -5.000  KL 1.000  val ELBO -5.500  (0:00 elapsed, at most 2:40 left in this stage)"
    # 720 epochs left of 800 at 0.2 s each: at most 2:24 (early stopping may end it sooner)
    at_80 = next(line for line in lines if line.startswith("epoch 80/800 "))
    assert at_80.endswith("(0:16 elapsed, at most 2:24 left in this stage)"), at_80
    assert any(line.startswith("epoch 200: the z-dependent noise scales open") for line in lines)
    assert any(line.startswith("epoch 345/800 ") and line.endswith("selection done)") for line in lines)
    switch = lines.index("selection over after 345 epochs; refit on all rows (train.refit) for 300 epochs")
    assert lines[switch + 1].startswith("refit on all rows, epoch 1/300 ")
    at_150 = next(line for line in lines if line.startswith("refit on all rows, epoch 150/300 "))
    assert at_150.endswith("(1:39 elapsed, 0:30 left in this stage)"), at_150  # 150 x 0.2 s, no bound
    assert lines[-1].startswith("refit on all rows, epoch 300/300 ") and lines[-1].endswith("refit done)")
