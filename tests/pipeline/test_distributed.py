"""torchrun -m pipeline train: two CPU processes (gloo) reach the closed-form pPCA optimum like one
process does, rank 0 alone writes, and an interrupted two-process run resumes with --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.config import load_params
from pipeline.stages.train import train_model
from tests.vae.closed_form import affine_vae_loglik, ppca_heldout_loglik
from tests.vae.conftest import ppca_rows
from vae import load_checkpoint, load_model

pytestmark = pytest.mark.slow  # two torchrun trainings of two processes each (about a minute)

REPO = Path(__file__).resolve().parents[2]
# pPCA as an affine VAE with a shared variance, no scaling: its exact p(y) is closed-form
SETTINGS = ["model.hidden_dims=[]", "model.decoder_variance=shared", "model.likelihood=gaussian",
            "model.latent_dim=2", "data.standardize=false", "train.val_fraction=0", "train.epochs=80",
            "train.lr=0.01", "train.batch_size=256", "train.kl_warmup_steps=0", "train.num_threads=1",
            "train.device=cpu", "train.init=random", "validate.iid=warn", "embed.score_samples=0"]


def _tables(root: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(10, 2, generator=gen, dtype=torch.float64)
    y = ppca_rows(6000, w, torch.randn(10, generator=gen, dtype=torch.float64), 0.3, gen).float()
    path = root / "train.parquet"
    pd.DataFrame(y[:4000].numpy(), columns=[f"y{j}" for j in range(10)]).to_parquet(path)
    return path, y[:4000], y[4000:]


def _torchrun(data: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "pipeline", "train", str(data), "--out", str(out), *extra, "--set", "train.checkpoint_every_s=0",
           *(a for s in SETTINGS for a in ("--set", s))]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _interrupt_after(proc: subprocess.Popen[str], out: Path, epochs: int, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while not ((out / "checkpoint.pt").exists() and load_checkpoint(out).epoch >= epochs):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # the launcher and both ranks
    proc.communicate(timeout=60)
    return load_checkpoint(out).epoch


def test_two_processes_interrupted_and_resumed_reach_the_closed_form_like_one(tmp_path: Path) -> None:
    data, train, test = _tables(tmp_path)
    out = tmp_path / "ddp"
    stopped_at = _interrupt_after(_torchrun(data, out), out, epochs=3)
    assert 3 <= stopped_at < 80 and not (out / "model.json").exists()
    resumed = _torchrun(data, out, "--resume")
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log[-3000:]
    assert log.count(f"trained {out}: 80 epochs") == 1  # rank 0 reports; rank 1 is silent
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["metadata"]["train_processes"] == 2
    assert len(pd.read_csv(out / "history.csv")) == 80
    assert sorted(p.name for p in out.iterdir()) == ["baselines.pt", "checkpoint.pt", "history.csv", "model.json", "run.json", "weights.pt"]

    one = train_model(data, tmp_path / "one", load_params(None, SETTINGS)).directory
    closed = ppca_heldout_loglik(train, test, 2, standardize=False)
    ll_two = float(affine_vae_loglik(load_model(out, "cpu"), test).mean())
    ll_one = float(affine_vae_loglik(load_model(one, "cpu"), test).mean())
    assert ll_two == pytest.approx(closed, abs=0.02), (ll_two, ll_one, closed)
    assert ll_two == pytest.approx(ll_one, abs=0.01), (ll_two, ll_one, closed)
