"""Who writes what (issue 24): one `train` per --out at a time, and modes from the user's umask."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.io.outputs import TRAIN_LOCK, claimed_dir
from tests.pipeline.helpers import FAST_ARGS, clean_table

ROOT = Path(__file__).resolve().parents[2]


def test_a_second_claim_of_a_folder_is_refused_while_the_first_holds_it(tmp_path):
    out = tmp_path / "m"
    with claimed_dir(out) as created:
        assert created and (out / TRAIN_LOCK).exists()
        busy = rf"--out {out} is being written by another `vaepipe train` \(.* pid {os.getpid()}\)"
        with pytest.raises(PipelineError, match=busy), claimed_dir(out):
            pass
        assert (out / TRAIN_LOCK).exists()  # the refused claim left the holder's lock alone
    assert not out.exists()  # created by the claim, nothing else written: gone with it


def test_two_trainings_into_one_out_one_is_refused_at_once_the_other_untouched(tmp_path, table_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline", "train", str(table_path), "--out", str(out), *FAST_ARGS]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while "pid" not in _text(out / TRAIN_LOCK):  # its holder's pid: written once the lock is held
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # paused holding the lock: the second run meets it however fast the first trains
    try:
        started = time.monotonic()
        second = subprocess.run([*cmd, "--set", "model.latent_dim=3"], env=env, capture_output=True, text=True,
                                timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    assert "is being written by another `vaepipe train`" in second.stderr
    assert time.monotonic() - started < 30  # at once: its start-up, not the first run's training
    assert first.wait(timeout=600) == 0, first.communicate()
    manifest = json.loads((out / "model.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert manifest["model"]["latent_dim"] == run["params"]["model"]["latent_dim"] == 2  # the first run's alone
    assert not (out / TRAIN_LOCK).exists()


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


@pytest.mark.parametrize("umask", [0o077, 0o002])
def test_every_file_and_folder_written_gets_the_umasks_mode(umask, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    days = tmp_path / "in" / "days"
    days.mkdir(parents=True)
    clean_table(n=200, seed=1).to_parquet(tmp_path / "in" / "train.parquet", index=False)
    clean_table(n=40, seed=2).to_parquet(days / "a.parquet", index=False)
    out = tmp_path / "out"
    out.mkdir()
    old = os.umask(umask)
    try:
        model = str(out / "m")
        assert main(["train", "in/train.parquet", "--out", model, *FAST_ARGS]) == 0
        assert main(["evaluate", model, "in/train.parquet", "--json", "out/metrics.json", *FAST_ARGS]) == 0
        assert main(["validate", "in/train.parquet", "--report", "out/report.json", *FAST_ARGS]) == 0
        assert main(["embed", model, "in/train.parquet", "out/e.parquet", *FAST_ARGS]) == 0
        assert main(["embed", model, str(days), "out/parts", *FAST_ARGS]) == 0
        assert main(["sample", model, "20", "out/s.csv", *FAST_ARGS]) == 0
        assert main(["prepare", "--set", "data.source=in/train.parquet", "--set", "data.prepared_dir=out/prepared"]) == 0
    finally:
        os.umask(old)
    modes = _modes(out)
    assert len(modes) > 15, modes
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o777 if (out / name).is_dir() else 0o666) & ~umask}
    assert wrong == {}, f"umask {oct(umask)}: {wrong}"


def test_two_embeddings_into_one_output_both_finish_and_leave_one_whole_file(tmp_path):
    """Started together on one table and one OUTPUT: both exit 0 in about the time of one each
    (one torch thread apiece: embed.num_threads), OUTPUT is one whole embedding, no temporary left."""
    table = tmp_path / "t.parquet"
    clean_table(n=300, seed=1).to_parquet(tmp_path / "train.parquet", index=False)
    clean_table(n=40_000, seed=2).to_parquet(table, index=False)
    assert main(["train", str(tmp_path / "train.parquet"), "--out", str(tmp_path / "m"), *FAST_ARGS]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "e.parquet"
    cmd = [sys.executable, "-m", "pipeline", "embed", str(tmp_path / "m"), str(table), str(out), *FAST_ARGS]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()) for p in procs]
    assert [code for code, _ in results] == [0, 0], results
    assert pq.read_table(out).num_rows == 40_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.parquet", "m", "t.parquet", "train.parquet"]
