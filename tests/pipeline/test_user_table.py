"""A user's own table, end to end (issue 17), and `dvc repro` itself: real dvc in a temporary git
copy of the project, real MLflow sqlite store at the project's default place, real Prefect flows,
`mlflow models serve` on 127.0.0.1. One copy for the module (one build, shared by the tests of the
pipeline through dvc): `built` adds a table, runs the pipeline, changes the table and runs it
again, then commits; each later test starts from that commit (the workspace restored with git and
`dvc checkout`, no stage rerun), so none depends on another having run before it. Tables refused
before training: test_user_table_refused.py; what dvc.yaml declares: test_dvc.py."""

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.pipeline.servers import free_port, server_env, wait_http
from tests.pipeline.user_project import NAME, ROOT, Repo, measurements, project_copy

pytestmark = pytest.mark.slow  # runs the whole pipeline in subprocesses (minutes)


@dataclass(frozen=True)
class Built:
    """What each step of building the geyser project printed and left."""
    first: str  # the first `dvc repro`
    first_rows: int  # n_rows of its metrics.json
    unchanged: str  # `dvc repro` again, nothing changed
    again: str  # `dvc repro` after the table lost rows
    again_rows: int
    readded: str  # `dvc repro` after `dvc add` of the changed table
    aliases: dict[str, str]  # of NAME, at the end


def _n_rows(repo: Repo) -> int:
    return int(json.loads((repo.path / "reports" / "metrics.json").read_text())["n_rows"])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repo, Built]:
    """geyser.csv (300 rows) dvc-added and run through the pipeline, cut to 199 rows and run again,
    added again; then the workspace committed."""
    repo = project_copy(tmp_path_factory.mktemp("user-table"))
    table = repo.path / "data" / "tables" / "geyser.csv"
    measurements().to_csv(table, index=False)
    repo.set_params(data={"source": "data/tables/geyser.csv"})
    repo.dvc("add", "data/tables/geyser.csv")
    first = repo.dvc("repro").stdout
    first_rows = _n_rows(repo)
    unchanged = repo.dvc("repro").stdout
    table.write_text("".join(table.read_text().splitlines(keepends=True)[:200]))  # header + 199 rows
    again = repo.dvc("repro").stdout
    again_rows = _n_rows(repo)
    repo.dvc("add", "data/tables/geyser.csv")  # the new version of the table, for git
    readded = repo.dvc("repro").stdout
    repo.sh("git", "add", "-A")
    repo.sh("git", "commit", "-qm", "geyser")
    return repo, Built(first, first_rows, unchanged, again, again_rows, readded, repo.aliases())


@pytest.fixture
def repo(built: tuple[Repo, Built]) -> Repo:
    """The built project as committed: tracked files from git, untracked ones removed, the outs of
    dvc.lock from the DVC cache. The MLflow store keeps what earlier tests registered."""
    repo = built[0]
    repo.sh("git", "checkout", "-q", "--", ".")
    repo.sh("git", "clean", "-fdq")
    repo.dvc("checkout", "--force")
    return repo


def test_a_changed_table_reruns_the_pipeline(built: tuple[Repo, Built]) -> None:
    _, run = built
    assert "Running stage 'register'" in run.first
    assert run.first_rows == 60
    assert "up to date" in run.unchanged
    assert "Running stage 'prepare'" in run.again and "Running stage 'train'" in run.again, run.again
    assert run.again_rows == 40
    assert "up to date" in run.readded
    assert run.aliases["challenger"] == "2"


def test_an_experiment_moves_no_alias(repo: Repo) -> None:
    """`dvc exp run -S`: the stages the param reaches rerun, the new version is registered without an
    alias, and promoting it afterwards goes through the gate."""
    before, versions = repo.aliases(), repo.versions()
    out = repo.dvc("exp", "run", "-S", "train.epochs=5").stdout
    assert "Running stage 'train'" in out and "Running stage 'prepare'" not in out, out
    assert yaml.safe_load((repo.path / "params.yaml").read_text())["train"]["epochs"] == 5
    history = (repo.path / "models" / "vae" / "history.csv").read_text()
    assert history.count(",select\n") == 5  # then the refit's epochs on all rows (train.refit)
    assert "Running stage 'evaluate'" in out, out  # (its figures may equal the last ones: on these 40
    # test rows both fits can end at the closed-form start, when no epoch beats it)
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


def test_another_table_needs_a_name_of_its_own(repo: Repo, prefect_api: str) -> None:
    other = repo.path / "data" / "tables" / "cells.csv"
    measurements(seed=2).rename(columns={"a": "area", "b": "width", "c": "depth"}).to_csv(other, index=False)
    repo.set_params(data={"source": "data/tables/cells.csv"})
    versions, aliases = repo.versions(), repo.aliases()
    done = repo.dvc("repro", ok=False)
    text = done.stdout + done.stderr
    assert "register.model_name" in text and "cells-vae" in text and "missing columns" in text, text
    assert repo.versions() == versions and repo.aliases() == aliases  # nothing registered under the name
    flow = repo.sh(sys.executable, "-m", "pipeline", "run", ok=False, env={**repo.env, "PREFECT_API_URL": prefect_api})
    assert flow.returncode == 2 and "register.model_name" in flow.stderr, flow.stderr
    assert repo.versions() == versions
    repo.set_params(register={"model_name": "cells-vae"})
    repo.dvc("repro")
    assert repo.aliases("cells-vae")["champion"] == "1" and repo.aliases() == aliases


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


# `dvc repro` on the built project: builds everything (test_a_changed_table_reruns_the_pipeline),
# then does nothing; no wall-clock time in any out; plots; `vaepipe summary`; code as a dependency.
# The committed workspace holds the second build: geyser cut to 199 rows, version 2 registered.


def _said(done: subprocess.CompletedProcess[str]) -> str:
    return done.stdout + done.stderr


def test_repro_builds_then_does_nothing(repo: Repo) -> None:
    metrics = json.loads((repo.path / "reports" / "metrics.json").read_text())
    assert metrics["n_rows"] == 40 and metrics["iw_samples"] == 20  # 20 % of 199 rows held out
    assert (repo.path / "models" / "vae" / "model.json").exists()
    assert json.loads((repo.path / "reports" / "registered.json").read_text())["version"] == "2"  # the second build's
    second = _said(repo.dvc("repro"))
    assert "up to date" in second.lower() and "Running stage" not in second
    shown = _said(repo.dvc("metrics", "show", "--json"))
    assert "log_likelihood" in shown


def test_forced_rerun_gives_the_same_hashes(repo: Repo) -> None:
    """No wall-clock time in any out: every stage but register (a registry side effect: a new version
    unless registration is idempotent) runs again and dvc.lock comes out byte for byte the same."""
    lock = (repo.path / "dvc.lock").read_text()
    assert "seconds" not in (repo.path / "reports" / "history.csv").read_text().splitlines()[0]
    stages = ["prepare", "validate", "train", "evaluate"]
    out = _said(repo.dvc("repro", "--force", "--single-item", *stages))
    assert all(f"Running stage '{s}'" in out for s in stages), out
    assert (repo.path / "dvc.lock").read_text() == lock
    evaluate = out.split("Running stage 'evaluate'", 1)[1]  # the last stage run: what it printed, then dvc's lines
    assert "kl_per_dim" not in evaluate and "log_likelihood" not in evaluate, evaluate  # the JSON: reports/metrics.json


def test_plots_show_labelled_curves_over_an_epoch_count_that_runs_on_through_the_refit(repo: Repo) -> None:
    """`dvc plots show`: ELBO and KL charts with labelled axes, x counting on through the refit (where
    `epoch` starts again), no chart of another column (phase); its output folder is git-ignored."""
    plots = json.loads(repo.dvc("plots", "show", "--json").stdout)["data"]
    assert sorted(k.split("::")[-1] for k in plots) == ["ELBO per epoch", "KL per epoch"], list(plots)
    for key, (plot,) in plots.items():
        content = plot["content"]
        text = json.dumps(content["encoding"]) + json.dumps(content["layer"])
        assert '"phase"' not in text and '"field": "epoch"' not in text, key
        assert content["encoding"]["x"] == {"field": "total_epoch", "type": "quantitative",
                                            "title": "epoch, counted over both stages"}
        assert "nats / row" in text, key
    history = pd.read_csv(repo.path / "reports" / "history.csv")
    assert (history["phase"] == "refit").any() and history["epoch"].is_monotonic_increasing is False
    assert history["total_epoch"].tolist() == list(range(1, len(history) + 1))
    assert list(history.columns[1:]) == ["epoch", "step", "beta", "lr", "train_elbo", "train_recon", "train_kl",
                                         "val_elbo", "val_recon", "val_kl", "val_log_likelihood", "phase"]
    repo.dvc("plots", "show")
    assert (repo.path / "dvc_plots" / "index.html").exists()
    assert repo.sh("git", "check-ignore", "-q", "dvc_plots/index.html", ok=None).returncode == 0


def test_summary_says_what_the_run_gave_in_a_few_lines(repo: Repo) -> None:
    """`make run` ends with `vaepipe summary`, not the metrics JSON: the held-out log-likelihood beside
    the full Gaussian, where the model, plots and MLflow UI are, and @champion."""
    assert "\t@$(BIN)/vaepipe summary" in (ROOT / "Makefile").read_text().split("\nrun:", 1)[1].split("\n\n")[0]
    # (that the evaluate stage prints no metrics JSON: test_forced_rerun_gives_the_same_hashes, on its rerun)
    done = repo.vaepipe("summary")
    assert done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    metrics = json.loads((repo.path / "reports" / "metrics.json").read_text())
    ll, full = metrics["log_likelihood"], metrics["baselines"]["full_gauss"]
    assert len(lines) <= 10, done.stdout
    assert lines[0].startswith(f"log-likelihood: {ll:.3f} ± {metrics['log_likelihood_stderr']:.3f} nats/row on 40 "
                               "held-out rows"), lines[0]
    assert f"full-covariance Gaussian: {full:.3f} nats/row; the VAE adds {ll - full:+.3f} nats/row" in done.stdout
    assert "model directory: models/vae" in lines
    version = json.loads((repo.path / "reports" / "registered.json").read_text())["version"]  # 2: the second build's
    assert re.search(rf"model: registered as models:/{NAME}/{version} \(MLflow run 'geyser 143x3 "
                     r"\d{4}-\d\d-\d\d \d\d:\d\d'\); (promoted|refused) ", done.stdout), done.stdout
    # 143 training rows: 199, less 40 (20 %) for test, less 16 (10 % of the other 159) for validation.
    # @champion: the first build's version 1, or a version test_an_experiment_moves_no_alias promoted
    champion = repo.aliases()["champion"]
    mine = " (this run's model)" if version == champion else ""
    assert f"@champion: models:/{NAME}/{champion}{mine}, held-out log-likelihood " in done.stdout
    plots = next(line for line in lines if line.startswith("plots: "))[7:].split(" (")[0]
    assert (Path(plots) / "loss_curves.png").is_file(), plots
    assert (f"MLflow UI: mlflow ui --backend-store-uri sqlite:///{repo.path / 'mlflow' / 'mlflow.db'}; then http://"
            in done.stdout)
    assert "`dvc plots show` writes dvc_plots/index.html" in done.stdout


def test_a_change_under_vae_reruns_evaluate(repo: Repo) -> None:
    """A change to the library (here a baseline's file) makes every stage stale, evaluate included
    (it used to depend on pipeline/evaluate.py only, and kept metrics.json from the old code)."""
    repo.dvc("repro")
    assert "up to date" in _said(repo.dvc("status")).lower()
    baselines = repo.path / "vae" / "baselines.py"
    before = baselines.read_text()
    try:
        baselines.write_text(before + "\n# a change\n")
        status = json.loads(_said(repo.dvc("status", "--json")))
        assert {"prepare", "validate", "train", "evaluate", "register"} <= set(status), status
        assert {"changed deps": {"vae": "modified"}} in status["evaluate"], status["evaluate"]
    finally:
        baselines.write_text(before)
    assert "up to date" in _said(repo.dvc("status")).lower()
