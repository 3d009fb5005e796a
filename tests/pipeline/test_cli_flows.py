"""run, promote and serve through the CLI, with their exit codes (README "Commands")."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest

from tests.pipeline.helpers import FAST_ARGS, IDS, clean_table, new_store, run
from tests.pipeline.servers import free_port


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = new_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield tmp_path
    mlflow.set_tracking_uri(uri.replace(str(tmp_path / "mlflow.db"), str(tmp_path / "gone.db")))


def test_a_folder_source_takes_its_newest_table(tmp_path, monkeypatch, capsys):
    import os

    monkeypatch.chdir(tmp_path)
    drops = tmp_path / "drops"
    drops.mkdir()
    code, _, err = run(capsys, "prepare", "--set", f"data.source={drops}", *IDS)
    assert code == 2 and str(drops) in err and "without any table" in err
    clean_table(n=100, seed=1).to_parquet(drops / "b.parquet", index=False)
    clean_table(n=200, seed=1).to_csv(drops / "a.csv", index=False)
    os.utime(drops / "b.parquet", (1, 1))  # older, whatever its name
    assert run(capsys, "prepare", "--set", f"data.source={drops}", *IDS)[0] == 0
    assert sum(len(pd.read_parquet(tmp_path / "data" / "prepared" / f"{s}.parquet")) for s in ("train", "val", "test")) == 200


def test_run_trains_registers_and_crowns_through_the_cli(prefect_harness, store, capsys):
    clean_table(seed=4).to_parquet(store / "table.parquet", index=False)
    code, out, _ = run(capsys, "run", "--out", str(store / "m"), *FAST_ARGS,
                       "--set", f"data.source={store / 'table.parquet'}")
    assert code == 0
    result = json.loads(out)
    assert result["version"] == "1" and result["promotion"]["promoted"] is True
    assert result["source"] == str(store / "table.parquet") and (store / "m" / "model.json").exists()


def test_promote_refused_by_the_gate_exits_1_and_moves_nothing(store, capsys):
    rows = clean_table(n=420, seed=5)  # one distribution (the seed also draws clean_table's weights)
    rows.iloc[:300].to_parquet(store / "train.parquet", index=False)
    rows.iloc[300:].to_parquet(store / "test.parquet", index=False)
    for seed in (0, 1):
        assert run(capsys, "train", str(store / "train.parquet"), "--out", str(store / f"m{seed}"), *FAST_ARGS,
                   "--set", f"train.seed={seed}")[0] == 0
    assert run(capsys, "register", str(store / "m0"), "--promote", "--data", str(store / "test.parquet"), *FAST_ARGS)[0] == 0
    assert run(capsys, "register", str(store / "m1"), *FAST_ARGS)[0] == 0
    code, _, err = run(capsys, "promote", "--data", str(store / "test.parquet"), *FAST_ARGS,
                       "--set", "register.min_improvement=1000")
    assert code == 1 and err.startswith("vaepipe: error: promotion refused") and len(err.strip().splitlines()) == 1
    assert "@champion stays on version 1" in err
    assert str(mlflow.MlflowClient().get_registered_model("measurement-vae").aliases["champion"]) == "1"


def test_serve_without_a_server_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    code, _, err = run(capsys, "serve", "--cron", "0 3 * * *")
    assert code == 2 and "prefect server start" in err and len(err.strip().splitlines()) == 1
    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    monkeypatch.setenv("PREFECT_API_URL", url)
    code, _, err = run(capsys, "serve")
    assert code == 2 and f"Prefect API {url} is unreachable" in err and "3 attempts" in err
    assert len(err.strip().splitlines()) == 1
