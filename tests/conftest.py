"""Test environment: every store in a temporary folder, no telemetry, set before prefect/mlflow import."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_ROOT = Path(tempfile.mkdtemp(prefix="vaepipe-tests-"))
os.environ.update(
    PREFECT_HOME=str(_ROOT / "prefect"),
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_LOGGING_LEVEL="WARNING",
    DO_NOT_TRACK="1",
    MLFLOW_DISABLE_TELEMETRY="true",
    MLFLOW_TRACKING_URI=f"sqlite:///{_ROOT / 'mlflow' / 'mlflow.db'}",
    DVC_NO_ANALYTICS="1",
    GIT_AUTHOR_NAME="vaepipe-tests",
    GIT_AUTHOR_EMAIL="tests@vaepipe.invalid",
    GIT_COMMITTER_NAME="vaepipe-tests",
    GIT_COMMITTER_EMAIL="tests@vaepipe.invalid",
)
os.environ.pop("PREFECT_API_URL", None)
(_ROOT / "mlflow").mkdir(parents=True, exist_ok=True)


def pytest_configure(config):
    """Outside the project's environment (a bare `pytest` without .venv) say so, not 3 import errors
    and an INTERNALERROR at the gpu marker."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("torch") is None:
        pytest.exit("torch is not installed in this Python: run `make test` (it installs .venv), or "
                    "`.venv/bin/python -m pytest` (for the GPU tests: `.venv/bin/python -m pytest -m gpu`)", returncode=4)
    # pytest-xdist's --dist loadfile hands out files in the order collected (below: slow files first)
    # only without its default reorder, which puts the files with the most tests first: the slow
    # files, a few tests each, then started last and one worker ran them alone at the end
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Files holding a test marked slow (a minute or more each) run first, so that under
    `--dist loadfile` the two workers end together instead of one waiting on a long file that
    started last. Tests marked gpu run where CUDA is, and are skipped elsewhere."""
    import pytest
    import torch

    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within each group stays
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
