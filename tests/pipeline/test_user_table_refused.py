"""A user's own table that the pipeline refuses before it trains (issue 17): each test in a fresh
temporary git copy of the project, real dvc and the `vaepipe` CLI (its Prefect flow included)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline.user_project import Repo, alternating, measurements, project_copy

pytestmark = pytest.mark.slow  # runs the whole pipeline in subprocesses (minutes)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return project_copy(tmp_path / "project")


def test_the_stage_refuses_a_table_dvc_would_not_see(repo: Repo) -> None:
    measurements().to_csv(repo.path / "data" / "geyser.csv", index=False)
    repo.set_params(data={"source": "data/geyser.csv"})
    done = repo.dvc("repro", ok=False)
    assert "outside data/tables" in done.stderr + done.stdout and "Running stage 'train'" not in done.stdout
    assert "dvc add data/tables/geyser.csv" in done.stderr + done.stdout
    done = repo.vaepipe("prepare", "--tables", "data/tables", ok=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert repo.vaepipe("prepare").returncode == 0  # by hand, any table


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
