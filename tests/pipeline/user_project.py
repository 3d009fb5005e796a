"""A user's project for the user-table tests: a temporary git copy of this one with fast params,
run through real dvc, the `vaepipe` CLI and the MLflow sqlite store at its default place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
NAME = "measurement-vae"
FAST = {"model": {"hidden_dims": [16], "latent_dim": 2}, "train": {"epochs": 15},
        "evaluate": {"iw_samples": 20}, "embed": {"score_samples": 10}}


class Repo:
    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.path, self.env = path, env
        self.client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])

    def sh(self, *args: str, ok: bool | None = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(list(args), cwd=self.path, env=env or self.env, capture_output=True, text=True,
                              timeout=900)
        if ok is not None:
            assert (done.returncode == 0) == ok, f"{args} exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done

    def dvc(self, *args: str, ok: bool | None = True) -> subprocess.CompletedProcess[str]:
        return self.sh(sys.executable, "-m", "dvc", *args, ok=ok)

    def vaepipe(self, *args: str, ok: bool | None = True) -> subprocess.CompletedProcess[str]:
        return self.sh(sys.executable, "-m", "pipeline", *args, ok=ok)

    def set_params(self, **sections: dict) -> None:
        path = self.path / "params.yaml"
        params = yaml.safe_load(path.read_text())
        for section, values in sections.items():
            params[section].update(values)
        path.write_text(yaml.safe_dump(params, sort_keys=False))

    def aliases(self, name: str = NAME) -> dict[str, str]:
        return {a: str(v) for a, v in self.client.get_registered_model(name).aliases.items()}

    def versions(self, name: str = NAME) -> list[str]:
        return sorted((str(v.version) for v in self.client.search_model_versions(f"name = '{name}'")), key=int)


def project_copy(path: Path) -> Repo:
    """The project's tracked files in PATH, FAST params, one git commit; its MLflow store is the
    default place, PATH/mlflow/mlflow.db."""
    path = path.resolve()
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (path / f).parent.mkdir(parents=True, exist_ok=True)
            (path / f).write_bytes((ROOT / f).read_bytes())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{path / 'mlflow' / 'mlflow.db'}"}  # the default place
    r = Repo(path, env)
    r.set_params(**FAST)
    r.sh("git", "init", "-q")
    r.sh("git", "add", "-A")
    r.sh("git", "commit", "-qm", "project")
    return r


def measurements(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """i.i.d. rows of three related columns."""
    rng = np.random.default_rng(seed)
    t = rng.normal(size=n)
    return pd.DataFrame({"a": t + 0.3 * rng.normal(size=n), "b": np.tanh(t) + 0.2 * rng.normal(size=n),
                         "c": 0.5 * t**2 + 0.3 * rng.normal(size=n)})


def alternating(n: int = 300) -> pd.DataFrame:
    """Like geyser's eruptions: column a alternates along the rows, lag-1 autocorrelation -0.701
    (an AR(1) with phi = -0.7); the default train split (72 % of the rows, in their order) shows
    only -0.434, under validate.max_autocorrelation 0.5."""
    df = measurements(n, seed=1)
    e, a = np.random.default_rng(0).normal(size=n), np.zeros(n)
    for t in range(n):
        a[t] = (-0.7 * a[t - 1] if t else 0.0) + e[t]
    return df.assign(a=a)
