"""Versioning a retraining run's data and model with DVC (the flow's `dvc=True`).

The flow writes what the dvc.yaml stages write, at their paths; `dvc commit` then records those
outputs in dvc.lock and the DVC cache without running the stages again, and `dvc push` sends
them to the default remote when one is configured. Run from the project's root (dvc.yaml).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import PipelineError
from vae.store import HISTORY, write_atomic

# the outputs of dvc.yaml's stages (keep in step with dvc.yaml)
PIPELINE = Path("dvc.yaml")
PREPARED = Path("data/prepared")
VALIDATION = Path("reports/validation.json")
MODEL = Path("models/vae")
HISTORY_PLOT = Path("reports/history.csv")
METRICS = Path("reports/metrics.json")
REGISTERED = Path("reports/registered.json")
TRAINING_STAGES = ("prepare", "validate", "train", "evaluate")
REGISTER_STAGE = "register"


TABLES = Path("data/tables")  # the prepare stage's dependency: where a user's tables live


def check_project(prepared_dir: str, source: str | None = None) -> None:
    """Refuse before any work when the cwd is not the project, the splits go elsewhere or a file
    data.source lies outside TABLES (dvc.lock would not record the table that was trained on)."""
    if not PIPELINE.is_file():
        raise PipelineError(f"versioning with DVC needs {PIPELINE} in the working directory {Path.cwd()}; "
                            "run from the project's root")
    if Path(prepared_dir) != PREPARED:
        raise PipelineError(f"data.prepared_dir is {prepared_dir!r} but dvc.yaml tracks {PREPARED}; "
                            "leave data.prepared_dir at its default to version with DVC")
    if source is not None:
        from pipeline.stages.prepare import check_tracked

        check_tracked(source, TABLES)


def install_model(trained: Path) -> Path:
    """Move a trained model directory to MODEL (the train stage's out), its history to HISTORY_PLOT."""
    if trained.resolve() != MODEL.resolve():
        old = MODEL.with_name(f".{MODEL.name}.old-{time.time_ns()}")
        if MODEL.exists():
            MODEL.rename(old)
        shutil.move(trained, MODEL)
        shutil.rmtree(old, ignore_errors=True)
    HISTORY_PLOT.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(HISTORY_PLOT, (MODEL / HISTORY).read_bytes())
    return MODEL


def dvc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True, timeout=600)


def _checked(*args: str) -> str:
    done = dvc(*args)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise PipelineError(f"`dvc {' '.join(args)}` failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    return done.stdout


def commit(stages: tuple[str, ...]) -> None:
    """Record the stages' current deps, params and outs in dvc.lock and the cache."""
    _checked("commit", "--force", "--quiet", *stages)


def default_remote() -> str | None:
    """core.remote of the project's DVC config (all levels merged); None when unset."""
    from dvc.config import Config

    remote = Config(dvc_dir=".dvc")["core"].get("remote")
    return str(remote) if remote else None


def push_if_remote() -> str | None:
    """`dvc push` to the default remote; its name, or None when no default remote is configured."""
    remote = default_remote()
    if remote is None:
        return None
    _checked("push", "--quiet")
    return remote
