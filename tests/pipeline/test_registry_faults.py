"""Registry faults: promotions racing from several processes; a registration retried after a failure."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.config import load_params
from pipeline.io.sources import synthetic_table
from pipeline.io.tables import write_table_atomic
from pipeline.registry.locks import promotion_lock
from pipeline.registry.register import register_model
from pipeline.stages.train import train_model
from tests.pipeline.helpers import own_store

NAME = "race-vae"
SETTINGS = ["data.id_columns=[row_id]", "model.latent_dim=2", "model.hidden_dims=[16]", "train.num_threads=1",
            "train.batch_size=32", "train.lr=0.01", "evaluate.iw_samples=30", "embed.score_samples=5",
            f"register.model_name={NAME}"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("registry-faults").resolve()
    with own_store(root):
        df = synthetic_table(300, 6, seed=1)
        write_table_atomic(df.iloc[:240], root / "train.parquet")
        write_table_atomic(df.iloc[240:].reset_index(drop=True), root / "test.parquet")
        yield root


def _promote(root: Path, version: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "pipeline", "promote", "--version", version, "--data", str(root / "test.parquet")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([*cmd, *(a for s in SETTINGS for a in ("--set", s))], cwd=root, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float = 180) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while text not in (line := proc.stderr.readline()):
        assert line or proc.poll() is None, f"exited {proc.returncode} before saying {text!r}"
        assert time.monotonic() < deadline


def test_four_racing_promotions_wait_their_turn_and_leave_a_chain_of_wins(root: Path) -> None:
    params = load_params(None, SETTINGS)
    versions = [register_model(train_model(root / "train.parquet", root / f"m{e}", load_params(None, [*SETTINGS, f"train.epochs={e}"])).directory,
                               params).version for e in (1, 3, 10, 30)]
    with promotion_lock(NAME):  # the test holds the gate: every racer must queue behind it
        procs = {v: _promote(root, v) for v in versions}
        for proc in procs.values():
            _wait_for_line(proc, "waiting for another promotion of race-vae")
        assert all(p.poll() is None for p in procs.values())
        assert "champion" not in MlflowClient().get_registered_model(NAME).aliases
    results = {v: (p.communicate(timeout=300)[1], p.returncode) for v, p in procs.items()}
    for v, (err, rc) in results.items():
        assert rc in (0, 1), f"version {v}: {err[-1500:]}"
        if rc == 1:  # refused, and says why
            assert "promotion refused" in err and "does not beat champion version" in err, err[-800:]
    client = MlflowClient()
    tags = {v: client.get_model_version(NAME, v).tags for v in versions}
    promoted = {v: t for v, t in tags.items() if t.get("gate_result") == "promoted"}
    firsts = [v for v, t in promoted.items() if "gate_champion_version" not in t]
    assert len(firsts) == 1  # exactly one promotion saw no champion
    chain, current = [firsts[0]], firsts[0]
    while nxt := [v for v, t in promoted.items() if t.get("gate_champion_version") == current]:
        assert len(nxt) == 1  # no two promotions replaced the same champion
        current = nxt[0]
        t = promoted[current]
        assert float(t["gate_log_likelihood"]) > float(t["gate_champion_log_likelihood"])
        chain.append(current)
    assert sorted(chain) == sorted(promoted)
    assert str(client.get_registered_model(NAME).aliases["champion"]) == chain[-1]
    assert sum(rc == 0 for _, rc in results.values()) == len(chain)


def test_a_registration_retried_after_the_version_exists_registers_no_duplicate(
        root: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import flow

    from pipeline.orchestration.flows import register_task

    params = load_params(None, [*SETTINGS, "register.model_name=retry-vae", "train.epochs=2"])
    model = train_model(root / "train.parquet", root / "retry-model", params).directory
    real, calls = MlflowClient.set_registered_model_alias, []

    def flaky(self: MlflowClient, name: str, alias: str, version: str) -> None:
        calls.append(version)
        if len(calls) == 1:  # the store drops the first alias call: the version exists already
            raise MlflowException("connection reset by peer (injected)")
        real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", flaky)
    monkeypatch.setattr(register_task, "retry_delay_seconds", [0.1, 0.1])

    @flow
    def register_once() -> str:
        return register_task(model, params, {"log_likelihood": -5.0}, root / "test.parquet").version

    assert register_once() == "1"
    assert calls == ["1", "1"]  # the retry found version 1 instead of creating version 2
    versions = MlflowClient().search_model_versions("name = 'retry-vae'")
    assert [v.version for v in versions] == ["1"] or [int(v.version) for v in versions] == [1]
    assert str(MlflowClient().get_registered_model("retry-vae").aliases["challenger"]) == "1"


def test_the_registry_lock_for_remote_stores_admits_one_holder_and_names_it(root: Path) -> None:
    from pipeline.errors import PipelineError
    from pipeline.registry.locks import _registry_lock

    with _registry_lock("lock-vae", timeout=5):
        assert MlflowClient().get_registered_model("lock-vae.promotion-lock").tags["holder"]
        with pytest.raises(PipelineError, match=r"another promotion of lock-vae \(.* pid \d+ since"), \
                _registry_lock("lock-vae", timeout=1):
            pass
    assert not MlflowClient().search_registered_models("name = 'lock-vae.promotion-lock'")  # released
