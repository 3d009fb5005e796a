"""A user's own table, end to end (issue 17): real dvc in a temporary git copy of the project, real
MLflow sqlite store at the project's default place, real Prefect flows, `mlflow models serve` on
127.0.0.1. The tests run in file order and build on each other, as a user would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from tests.pipeline.servers import free_port, server_env, wait_http

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


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    path = tmp_path_factory.mktemp("user-table").resolve()
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


def test_the_stage_refuses_a_table_dvc_would_not_see(repo: Repo) -> None:
    measurements().to_csv(repo.path / "data" / "geyser.csv", index=False)
    repo.set_params(data={"source": "data/geyser.csv"})
    done = repo.dvc("repro", ok=False)
    assert "outside data/tables" in done.stderr + done.stdout and "Running stage 'train'" not in done.stdout
    assert "dvc add data/tables/geyser.csv" in done.stderr + done.stdout
    done = repo.vaepipe("prepare", "--tables", "data/tables", ok=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert repo.vaepipe("prepare").returncode == 0  # by hand, any table


def test_a_changed_table_reruns_the_pipeline(repo: Repo) -> None:
    (repo.path / "data" / "geyser.csv").rename(repo.path / "data" / "tables" / "geyser.csv")
    repo.set_params(data={"source": "data/tables/geyser.csv"})
    repo.dvc("add", "data/tables/geyser.csv")
    first = repo.dvc("repro").stdout
    assert "Running stage 'register'" in first
    assert json.loads((repo.path / "reports" / "metrics.json").read_text())["n_rows"] == 60
    assert "up to date" in repo.dvc("repro").stdout
    table = repo.path / "data" / "tables" / "geyser.csv"
    table.write_text("".join(table.read_text().splitlines(keepends=True)[:200]))  # header + 199 rows
    again = repo.dvc("repro").stdout
    assert "Running stage 'prepare'" in again and "Running stage 'train'" in again, again
    assert json.loads((repo.path / "reports" / "metrics.json").read_text())["n_rows"] == 40
    repo.dvc("add", "data/tables/geyser.csv")  # the new version of the table, for git
    assert "up to date" in repo.dvc("repro").stdout
    assert repo.aliases()["challenger"] == "2"


def test_an_experiment_moves_no_alias(repo: Repo) -> None:
    repo.sh("git", "add", "-A")
    repo.sh("git", "commit", "-qm", "geyser")
    before, versions = repo.aliases(), repo.versions()
    out = repo.dvc("exp", "run", "-S", "train.epochs=5").stdout
    assert "Running stage 'register'" in out and "without an alias" in out, out
    assert repo.aliases() == before  # neither @challenger nor @champion moved, and no gate ran
    [new] = [v for v in repo.versions() if v not in versions]
    registered = json.loads((repo.path / "reports" / "registered.json").read_text())
    assert registered["version"] == new and registered["experiment"]
    tags = repo.client.get_model_version(NAME, new).tags
    assert tags["dvc_experiment"] == registered["experiment"] and "gate_result" not in tags
    assert f"vaepipe promote --version {new}" in out
    repo.sh("git", "checkout", "--", ".")  # back to the committed workspace
    repo.dvc("checkout")
    promoted = repo.vaepipe("promote", "--version", new, ok=None)  # on purpose, behind the gate
    assert promoted.returncode in (0, 1) and f"version {new} of {NAME}" in promoted.stdout + promoted.stderr
    assert repo.aliases()["champion"] == (new if promoted.returncode == 0 else before["champion"])


def test_another_table_needs_a_name_of_its_own(repo: Repo) -> None:
    other = repo.path / "data" / "tables" / "cells.csv"
    measurements(seed=2).rename(columns={"a": "area", "b": "width", "c": "depth"}).to_csv(other, index=False)
    repo.set_params(data={"source": "data/tables/cells.csv"})
    versions, aliases = repo.versions(), repo.aliases()
    done = repo.dvc("repro", ok=False)
    text = done.stdout + done.stderr
    assert "register.model_name" in text and "cells-vae" in text and "missing columns" in text, text
    assert repo.versions() == versions and repo.aliases() == aliases  # nothing registered under the name
    flow = repo.vaepipe("run", ok=False)
    assert flow.returncode == 2 and "register.model_name" in flow.stderr, flow.stderr
    assert repo.versions() == versions
    repo.set_params(register={"model_name": "cells-vae"})
    repo.dvc("repro")
    assert repo.aliases("cells-vae")["champion"] == "1" and repo.aliases() == aliases


def test_both_entry_points_give_one_verdict(repo: Repo) -> None:
    alternating().to_csv(repo.path / "data" / "tables" / "eruptions.csv", index=False)
    repo.set_params(data={"source": "data/tables/eruptions.csv"}, register={"model_name": "eruptions-vae"})
    done = repo.dvc("repro", ok=False)
    assert "Running stage 'train'" not in done.stdout, done.stdout
    line = next(x for x in done.stdout.splitlines() if x.startswith("FAIL autocorrelation column 'a'"))
    assert "-0.701" in line and "alternate" in line, line
    flow = repo.vaepipe("run", ok=False)
    assert flow.returncode == 1, flow.stderr
    error = flow.stderr.strip().splitlines()[-1]
    assert "autocorrelation column 'a'" in error and "-0.701" in error and "alternate" in error, error
    repo.set_params(data={"source": "data/tables/geyser.csv"}, register={"model_name": NAME})
    repo.dvc("repro")


DOC = ROOT / "docs" / "operations.md"  # "The registered model from Python and as a REST endpoint"


def _doc_block(marker: str) -> str:
    blocks = re.findall(r"```(\w+)\n(.*?)```", DOC.read_text(), flags=re.S)
    found = [body for _, body in blocks if marker in body]
    assert len(found) == 1, f"{DOC.name}: {len(found)} code blocks hold {marker!r}"
    return textwrap.dedent(found[0])  # a block inside a list item is indented


def test_the_docs_load_the_champion_as_written(repo: Repo) -> None:
    """docs/operations.md's Python lines, run from the project root with no MLFLOW_TRACKING_URI."""
    env = {k: v for k, v in repo.env.items() if k != "MLFLOW_TRACKING_URI"}
    code = _doc_block("mlflow.pyfunc.load_model")
    done = repo.sh(sys.executable, "-c", code, env=env)
    assert "z_0" in done.stdout, done.stdout
    assert not (repo.path / "mlflow.db").exists()


def test_the_docs_serve_the_champion_as_written(repo: Repo) -> None:
    """docs/operations.md's shell lines (on a free port), then a request with a NaN cell: a 400 whose
    message names the column and the row."""
    env = {k: v for k, v in server_env().items() if k != "MLFLOW_TRACKING_URI"}
    script = _doc_block("mlflow models serve")
    port = free_port()
    assert "--port 5001" in script
    script = script.replace("--port 5001", f"--port {port}")
    log = repo.path.parent / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-c", script], cwd=repo.path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/ping", proc, log)
        rows = pd.read_parquet(repo.path / "data" / "prepared" / "test.parquet").head(5)
        rows.loc[2, "b"] = np.nan
        body = json.dumps({"dataframe_split": {"columns": list(rows.columns), "data": rows.values.tolist()}})
        req = urllib.request.Request(f"{url}/invocations", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(req, timeout=60)
        assert answer.value.code == 400
        message = json.loads(answer.value.read())["message"].strip().splitlines()[-1]
        assert "'b'" in message and "row 2" in message, message
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert not (repo.path / "mlflow.db").exists()
