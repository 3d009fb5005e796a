"""Scheduled retraining for real: a Prefect server, `vaepipe serve`, `prefect deployment run`.

One project copy (git + DVC, a local DVC remote) and one served deployment for the module, on the
session's Prefect server (the harness's: a real API server on 127.0.0.1, as `prefect server start`
runs it, so the module starts no server of its own). Three triggered runs build on each other, so
one test makes them in turn: a good table makes version 1 the champion, a small table registers
version 2 and the gate keeps version 1, a drifted table fails validation naming its drifted columns
and registers nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.io.sources import synthetic_table
from tests.pipeline.servers import server, server_env

pytestmark = pytest.mark.slow  # a runner (`vaepipe serve`) and three flow runs (runs in `make test`)
ROOT = Path(__file__).resolve().parents[2]
NAME = "measurement-vae"
COLS = 8
FAST = {"model": {"hidden_dims": [16], "latent_dim": 2},
        "train": {"epochs": 15, "kl_warmup_steps": 0, "early_stopping_patience": 15},
        "evaluate": {"iw_samples": 20}, "embed": {"score_samples": 10}}


@dataclass
class Project:
    repo: Path
    api: str
    env: dict[str, str]
    log: Path
    drops: int = 0
    watched: str = ""  # what the last `--watch` printed

    def drop(self, df: pd.DataFrame) -> None:
        """A new table arrives in data.source (the newest one is trained on)."""
        self.drops += 1
        path = self.repo / "data" / "tables" / f"batch-{self.drops}.parquet"
        df.to_parquet(path, index=False)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + self.drops))

    def run(self) -> tuple[int, dict]:
        """`prefect deployment run --watch`; its exit code and the finished flow run."""
        done = subprocess.run(["prefect", "deployment", "run", "vaepipe-train/retrain", "--watch",
                               "--watch-timeout", "240"], env=self.env, cwd=self.repo,
                              capture_output=True, text=True, timeout=300)
        self.watched = " ".join(done.stdout.split())  # the console wraps long lines
        found = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout)
        assert found, f"{done.stdout}\n{done.stderr}"
        with urllib.request.urlopen(f"{self.api}/flow_runs/{found[1]}", timeout=10) as r:
            return done.returncode, json.loads(r.read())

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.env["MLFLOW_TRACKING_URI"])

    def versions(self) -> list[str]:
        return sorted(str(v.version) for v in self.client().search_model_versions(f"name = '{NAME}'"))

    def champion(self) -> str:
        return str(self.client().get_registered_model(NAME).aliases["champion"])

    def lock_md5(self, stage: str, path: str) -> str:
        lock = yaml.safe_load((self.repo / "dvc.lock").read_text())["stages"][stage]
        return next(o["md5"] for o in lock["outs"] if o["path"] == path)


def _copy_project(repo: Path, remote: Path, env: dict[str, str]) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    # half the rows held out: the gate then compares on enough rows to tell a 30-row fit from a 400-row one
    params["data"].update(source="data/tables", id_columns=["row_id"], test_fraction=0.5)
    for section, values in FAST.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "data" / "tables").mkdir(parents=True, exist_ok=True)
    for args in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(remote)],
                 ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Iterator[Project]:
    root = tmp_path_factory.mktemp("scheduled").resolve()
    repo, remote = root / "repo", root / "dvc-remote"
    repo.mkdir()
    base = server_env(MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow' / 'mlflow.db'}")
    _copy_project(repo, remote, base)
    env = {**base, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(root / "client"),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_LOGGING_LEVEL": "INFO"}
    serve_args = [sys.executable, "-m", "pipeline", "serve", "--cron", "0 3 * * *"]
    with server(serve_args, f"{prefect_api}/deployments/name/vaepipe-train/retrain", root / "serve.log", env, repo):
        yield Project(repo, prefect_api, env, root / "serve.log")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])


def test_deployment_is_served_on_its_cron(project: Project) -> None:
    with urllib.request.urlopen(f"{project.api}/deployments/name/vaepipe-train/retrain", timeout=10) as r:
        deployment = json.loads(r.read())
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
    assert deployment["parameters"]["dvc"] is True


def _a_triggered_run_registers_a_champion_and_versions_it_with_dvc(project: Project) -> None:
    project.drop(synthetic_table(400, COLS, seed=1))
    code, run = project.run()
    assert code == 0 and run["state"]["type"] == "COMPLETED", project.log.read_text()[-3000:]
    assert project.versions() == ["1"] and project.champion() == "1"
    # what the gate decided: the final state's name (which `--watch` ends with) and message
    assert run["state"]["name"] == "Promoted v1", run["state"]
    assert re.fullmatch(r"promoted v1, the first champion \(-?\d+\.\d{3} nats/row held out\)", run["state"]["message"])
    assert project.watched.endswith("Flow run finished successfully in 'Promoted v1'."), project.watched[-300:]
    model_md5 = project.lock_md5("train", "models/vae")
    assert (project.repo / ".dvc" / "cache" / "files" / "md5" / model_md5[:2] / model_md5[2:]).exists()
    assert json.loads((project.repo / "reports" / "registered.json").read_text())["version"] == "1"
    assert any((project.repo.parent / "dvc-remote").rglob("*.dir")), "dvc push sent the model to the remote"
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project.repo, env=project.env,
                            capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout  # dvc.lock matches the workspace


def _a_run_on_clearly_worse_data_leaves_the_champion(project: Project) -> None:
    before = project.lock_md5("prepare", "data/prepared")
    project.drop(synthetic_table(40, COLS, seed=3))  # 29 training rows for 8 columns: a worse fit
    code, run = project.run()
    assert code == 0 and run["state"]["type"] == "COMPLETED", project.log.read_text()[-3000:]
    assert project.versions() == ["1", "2"] and project.champion() == "1"
    assert project.client().get_model_version(NAME, "2").tags["gate_result"] == "refused"
    assert run["state"]["name"] == "Champion kept v1", run["state"]
    assert re.fullmatch(r"refused: v2 scores -?\d+\.\d{3} nats/row held out, not above v1's -?\d+\.\d{3}; "
                        r"@champion stays v1", run["state"]["message"]), run["state"]["message"]
    assert project.watched.endswith("Flow run finished successfully in 'Champion kept v1'."), project.watched[-300:]
    assert project.lock_md5("prepare", "data/prepared") != before  # this run's data is versioned too


def _a_run_on_drifted_data_fails_validation_and_registers_nothing(project: Project) -> None:
    lock = (project.repo / "dvc.lock").read_text()
    drifted = synthetic_table(400, COLS, seed=4)
    for col, sd in (("x1", 1.0), ("x3", -1.5)):
        drifted[col] += sd * drifted[col].std()
    project.drop(drifted)
    code, run = project.run()
    assert code == 1 and run["state"]["type"] == "FAILED"
    message = run["state"]["message"]
    # shifts in the champion's training sd, about the +1 and -1.5 table sd drawn here
    assert re.search(r"drifted columns 'x1' \(\+1\.\d\d sd, KS [\d.]+\), 'x3' \(-1\.\d\d sd", message), message
    assert not any(f"'x{j}'" in message for j in (0, 2, 4, 5, 6, 7))
    assert project.versions() == ["1", "2"] and project.champion() == "1"
    assert (project.repo / "dvc.lock").read_text() == lock


def test_triggered_runs_promote_a_champion_keep_it_against_worse_data_and_refuse_drifted_data(
        project: Project) -> None:
    _a_triggered_run_registers_a_champion_and_versions_it_with_dvc(project)
    _a_run_on_clearly_worse_data_leaves_the_champion(project)  # version 1 is the champion to keep
    _a_run_on_drifted_data_fails_validation_and_registers_nothing(project)  # versions 1 and 2 stay
