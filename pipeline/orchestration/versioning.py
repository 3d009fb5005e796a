"""Versioning a retraining run's data and model with DVC (the flow's `dvc=True`).

dvc.yaml describes the pipeline once: its stages, their data dependencies and where each writes.
The flow reads those here (read_stages) and writes what the stages write, at those paths; `dvc
commit` then records them in dvc.lock and the DVC cache without running the stages again, and
`dvc push` sends them to the default remote when one is configured. Run from the project's root.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError
from vae.store import HISTORY, write_atomic

PIPELINE = Path("dvc.yaml")
CODE = ("pipeline", "vae")  # every stage depends on both packages as a whole: code, not data
FLOW = ("prepare", "validate", "train", "evaluate", "register")  # the stages training_flow(dvc=True) writes
REGISTER = "register"  # recorded last: the registration's lineage tags read the others from dvc.lock


@dataclass(frozen=True)
class DvcStages:
    """What the flow writes as dvc.yaml's stages, read from dvc.yaml: the stages and their paths."""

    names: tuple[str, ...]  # in dvc.yaml's order
    tables: Path  # prepare's data dependency: where a user's tables live
    prepared: Path  # prepare's out: the splits (data.prepared_dir)
    validation: Path  # validate's out: the report
    model: Path  # train's first out: the model directory
    history: Path  # train's other out: the training curves `dvc plots` draws
    metrics: Path  # evaluate's metrics file
    registered: Path  # register's out: name and version

    @property
    def training(self) -> tuple[str, ...]:
        """The stages recorded before the registration."""
        return tuple(name for name in self.names if name != REGISTER)

    @property
    def outputs(self) -> tuple[Path, ...]:
        return (self.prepared, self.validation, self.model, self.history, self.metrics, self.registered)


def read_stages(path: Path = PIPELINE) -> DvcStages:
    """The stages of a dvc.yaml as the flow writes them; PipelineError naming what it cannot follow."""
    try:
        stages = yaml.safe_load(Path(path).read_text(encoding="utf-8"))["stages"]
        names = tuple(stages)
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise PipelineError(f"{path} is not a readable dvc.yaml with stages ({exc.__class__.__name__})") from None
    if set(names) != set(FLOW):
        raise PipelineError(f"{path} has the stages {', '.join(names)}; `vaepipe run --dvc` writes {', '.join(FLOW)}: "
                            "version this pipeline with `dvc repro`, or run without --dvc")
    tables = [p for p in _paths(stages["prepare"], "deps") if str(p) not in CODE]
    trained = _paths(stages["train"], "outs")
    if len(trained) != 2:
        raise PipelineError(f"{path}: stage train has {len(trained)} outs; `vaepipe run --dvc` writes 2: the model "
                            "directory, then the history its plots draw")
    model, history = trained
    return DvcStages(
        names=names, tables=_single(tables, "prepare", "data dependency besides the code", path),
        prepared=_single(_paths(stages["prepare"], "outs"), "prepare", "out", path),
        validation=_single(_paths(stages["validate"], "outs"), "validate", "out", path),
        model=model, history=history,
        metrics=_single(_paths(stages["evaluate"], "metrics"), "evaluate", "metrics file", path),
        registered=_single(_paths(stages["register"], "outs"), "register", "out", path),
    )


def _paths(stage: Any, key: str) -> list[Path]:
    """A stage's deps, outs or metrics as paths (an entry is a path, or {path: options})."""
    entries = (stage.get(key) or []) if isinstance(stage, dict) else []
    return [Path(str(next(iter(e)) if isinstance(e, dict) else e)) for e in entries]


def _single(paths: list[Path], stage: str, what: str, where: Path) -> Path:
    if len(paths) != 1:
        raise PipelineError(f"{where}: `vaepipe run --dvc` needs one {what} in stage {stage}, not {len(paths)} "
                            f"({', '.join(map(str, paths)) or 'none'})")
    return paths[0]


def check_project(prepared_dir: str, source: str | None = None) -> DvcStages:
    """dvc.yaml's stages, or a refusal before any work when the cwd is not the project, the splits go
    elsewhere or a file data.source lies outside the prepare stage's tables folder (dvc.lock would
    not record the table that was trained on)."""
    if not PIPELINE.is_file():
        raise PipelineError(f"versioning with DVC needs {PIPELINE} in the working directory {Path.cwd()}; "
                            "run from the project's root")
    stages = read_stages(PIPELINE)
    if Path(prepared_dir) != stages.prepared:
        raise PipelineError(f"data.prepared_dir is {prepared_dir!r} but dvc.yaml tracks {stages.prepared}; "
                            "leave data.prepared_dir at its default to version with DVC")
    if source is not None:
        from pipeline.stages.prepare import check_tracked

        check_tracked(source, stages.tables)
    return stages


def install_model(trained: Path, stages: DvcStages) -> Path:
    """Move a trained model directory to the train stage's model out, its history to the other out."""
    model = stages.model
    if trained.resolve() != model.resolve():
        old = model.with_name(f".{model.name}.old-{time.time_ns()}")
        if model.exists():
            model.rename(old)
        shutil.move(trained, model)
        shutil.rmtree(old, ignore_errors=True)
    stages.history.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(stages.history, (model / HISTORY).read_bytes())
    return model


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
