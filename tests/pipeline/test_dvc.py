"""`dvc repro` in a temporary git copy of the project: builds everything, then does nothing.
(`dvc exp run -S`: test_user_table.py.)

One copy for the module, built once (`built`: the first `dvc repro`, then a commit); each test that
uses it starts from that commit (`repo`: the workspace restored with git and `dvc checkout`, no
stage rerun), so none depends on another having run before it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow  # runs the whole pipeline in subprocesses (minutes)

ROOT = Path(__file__).resolve().parents[2]


def _sh(args, cwd, env):
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{args}: {r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    repo = tmp_path_factory.mktemp("dvc-repo")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source="synthetic:400x6", id_columns=["row_id"])
    params["model"].update(hidden_dims=[16], latent_dim=2)
    params["train"].update(epochs=15, kl_warmup_steps=0)
    params["evaluate"].update(iw_samples=20)
    params["embed"].update(score_samples=10)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow' / 'mlflow.db'}"}
    _sh(["git", "init", "-q"], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-qm", "copy"], repo, env)
    _sh([sys.executable, "-m", "dvc", "repro"], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-qm", "repro"], repo, env)
    return repo, env


@pytest.fixture
def repo(built):
    """The built copy as committed: tracked files from git, untracked ones removed, the outs of
    dvc.lock from the DVC cache. The MLflow store keeps what earlier tests registered."""
    path, env = built
    _sh(["git", "checkout", "-q", "--", "."], path, env)
    _sh(["git", "clean", "-fdq"], path, env)
    _sh([sys.executable, "-m", "dvc", "checkout", "--force"], path, env)
    return path, env


def test_repro_builds_then_does_nothing(repo):
    path, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    metrics = json.loads((path / "reports" / "metrics.json").read_text())
    assert metrics["n_rows"] == 80 and metrics["iw_samples"] == 20
    assert (path / "models" / "vae" / "model.json").exists()
    assert json.loads((path / "reports" / "registered.json").read_text())["version"] == "1"
    second = _sh([*dvc, "repro"], path, env)
    assert "up to date" in second.lower() and "Running stage" not in second
    shown = _sh([*dvc, "metrics", "show", "--json"], path, env)
    assert "log_likelihood" in shown


def test_forced_rerun_gives_the_same_hashes(repo):
    """No wall-clock time in any out: every stage but register (a registry side effect: a new version
    unless registration is idempotent) runs again and dvc.lock comes out byte for byte the same."""
    path, env = repo
    lock = (path / "dvc.lock").read_text()
    assert "seconds" not in (path / "reports" / "history.csv").read_text().splitlines()[0]
    stages = ["prepare", "validate", "train", "evaluate"]
    out = _sh([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", *stages], path, env)
    assert all(f"Running stage '{s}'" in out for s in stages), out
    assert (path / "dvc.lock").read_text() == lock


def test_plots_show_labelled_curves_over_an_epoch_count_that_runs_on_through_the_refit(repo):
    """`dvc plots show`: ELBO and KL charts with labelled axes, x counting on through the refit (where
    `epoch` starts again), no chart of another column (phase); its output folder is git-ignored."""
    path, env = repo
    done = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=path, env=env,
                          capture_output=True, text=True, check=True)
    plots = json.loads(done.stdout)["data"]
    assert sorted(k.split("::")[-1] for k in plots) == ["ELBO per epoch", "KL per epoch"], list(plots)
    for key, (plot,) in plots.items():
        content = plot["content"]
        text = json.dumps(content["encoding"]) + json.dumps(content["layer"])
        assert '"phase"' not in text and '"field": "epoch"' not in text, key
        assert content["encoding"]["x"] == {"field": "total_epoch", "type": "quantitative",
                                            "title": "epoch, counted over both stages"}
        assert "nats / row" in text, key
    history = pd.read_csv(path / "reports" / "history.csv")
    assert (history["phase"] == "refit").any() and history["epoch"].is_monotonic_increasing is False
    assert history["total_epoch"].tolist() == list(range(1, len(history) + 1))
    assert list(history.columns[1:]) == ["epoch", "step", "beta", "lr", "train_elbo", "train_recon", "train_kl",
                                         "val_elbo", "val_recon", "val_kl", "phase"]
    subprocess.run([sys.executable, "-m", "dvc", "plots", "show"], cwd=path, env=env, capture_output=True, check=True)
    assert (path / "dvc_plots" / "index.html").exists()
    assert subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=path).returncode == 0


def test_summary_says_what_the_run_gave_in_a_few_lines(repo):
    """`make run` ends with `vaepipe summary`, not the metrics JSON: the held-out log-likelihood beside
    the full Gaussian, where the model, plots and MLflow UI are, and @champion."""
    path, env = repo
    assert "\t@$(BIN)/vaepipe summary" in (ROOT / "Makefile").read_text().split("\nrun:", 1)[1].split("\n\n")[0]
    out = _sh([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "evaluate"], path, env)
    assert "kl_per_dim" not in out and "log_likelihood" not in out, out  # the JSON went to reports/metrics.json
    done = subprocess.run([sys.executable, "-m", "pipeline", "summary"], cwd=path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    metrics = json.loads((path / "reports" / "metrics.json").read_text())
    ll, full = metrics["log_likelihood"], metrics["baselines"]["full_gauss"]
    assert len(lines) <= 10, done.stdout
    assert lines[0].startswith(f"log-likelihood: {ll:.3f} ± {metrics['log_likelihood_stderr']:.3f} nats/row on 80 "
                               "held-out rows"), lines[0]
    assert f"full-covariance Gaussian: {full:.3f} nats/row; the VAE adds {ll - full:+.3f} nats/row" in done.stdout
    assert "model directory: models/vae" in lines
    version = json.loads((path / "reports" / "registered.json").read_text())["version"]  # 2 after an exp run
    assert re.search(rf"model: registered as models:/measurement-vae/{version} \(MLflow run 'synthetic 288x6 "
                     r"\d{4}-\d\d-\d\d \d\d:\d\d'\); (promoted|refused|DVC experiment \S+, no alias moved) ", done.stdout), done.stdout
    # 288 rows: 400, less 20 % for test, less 10 % of the rest for validation; the first repro's version is champion
    mine = " (this run's model)" if version == "1" else ""
    assert f"@champion: models:/measurement-vae/1{mine}, held-out log-likelihood " in done.stdout
    plots = next(line for line in lines if line.startswith("plots: "))[7:].split(" (")[0]
    assert (Path(plots) / "loss_curves.png").is_file(), plots
    assert f"MLflow UI: mlflow ui --backend-store-uri sqlite:///{path / 'mlflow' / 'mlflow.db'}; then http://" in done.stdout
    assert "`dvc plots show` writes dvc_plots/index.html" in done.stdout


def test_a_fresh_clone_rewrites_no_committed_file():
    """Stage outputs depend on the CPU that computed them (a fresh clone's `make run` got 36.68
    nats/row against 37.78 committed): neither dvc.lock nor any out, metric or plot of dvc.yaml is
    in git, so `dvc repro` on a fresh clone leaves `git diff` empty."""
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split())
    outs = {"dvc.lock"}
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for key in ("outs", "metrics", "plots"):
            outs |= {next(iter(o)) if isinstance(o, dict) else o for o in stage.get(key, [])}
    committed = sorted(f for f in tracked if any(f == o or f.startswith(o.rstrip("/") + "/") for o in outs))
    assert not committed, f"stage outputs committed to git: {committed}"


def test_every_stage_depends_on_all_the_code():
    """Complete by construction: each stage runs the `vaepipe` CLI, whose steps import across both
    packages (and read the defaults in pipeline/config.py and vae/config.py), so each depends on
    both folders as a whole; their bytecode is ignored (.dvcignore), so running them changes nothing."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert {"pipeline", "vae"} <= set(stage["deps"]), f"stage {name} deps {stage['deps']}"
    ignored = (ROOT / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored


def test_a_change_under_vae_reruns_evaluate(repo):
    """A change to the library (here a baseline's file) makes every stage stale, evaluate included
    (it used to depend on pipeline/evaluate.py only, and kept metrics.json from the old code)."""
    path, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    _sh([*dvc, "repro"], path, env)
    assert "up to date" in _sh([*dvc, "status"], path, env).lower()
    baselines = path / "vae" / "baselines.py"
    before = baselines.read_text()
    try:
        baselines.write_text(before + "\n# a change\n")
        status = json.loads(_sh([*dvc, "status", "--json"], path, env))
        assert {"prepare", "validate", "train", "evaluate", "register"} <= set(status), status
        assert {"changed deps": {"vae": "modified"}} in status["evaluate"], status["evaluate"]
    finally:
        baselines.write_text(before)
    assert "up to date" in _sh([*dvc, "status"], path, env).lower()
