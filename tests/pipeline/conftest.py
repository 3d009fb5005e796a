"""Shared fixtures: small tables, fast params, one Prefect harness per session."""

from __future__ import annotations

import pytest

from tests.pipeline.helpers import clean_table


@pytest.fixture(scope="session")
def prefect_harness():
    # prefect.main configures logging (a dictConfig of the root logger) when imported: import it
    # here, before a test's log capture attaches, not inside a test whose caplog it would drop
    import prefect.main  # noqa: F401
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def prefect_api(prefect_harness) -> str:
    """The harness server's API URL, for subprocesses (PREFECT_API_URL): a `vaepipe run` then starts
    no temporary Prefect server of its own (test_user_table_refused.py keeps one), `vaepipe serve`
    serves its deployment there."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


@pytest.fixture
def table_path(tmp_path):
    path = tmp_path / "table.parquet"
    clean_table().to_parquet(path, index=False)
    return path
