"""Model directories: round trip, weights-only loading, clear errors, atomic writes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vae
from vae import atomic, store


@pytest.fixture(scope="module")
def trained() -> tuple[vae.VAE, vae.TrainConfig, vae.FitResult, torch.Tensor]:
    torch.set_num_threads(1)
    y = torch.randn(100, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 10.0, 0.1, 5.0])
    torch.manual_seed(0)
    model = vae.VAE(vae.describe_table(y, names=["a", "b", "c", "d"]), vae.ModelConfig(latent_dim=2, hidden_dims=(8,)))
    cfg = vae.TrainConfig(epochs=3, device="cpu", val_fraction=0.2, refit=False)  # a checkpoint at epoch 3
    return model, cfg, vae.fit(model, y, cfg), y


def test_save_and_load_round_trip(tmp_path, trained):
    model, cfg, result, y = trained
    store.save_model(tmp_path, model, cfg, result.history, metadata={"run": "r1"})
    loaded = vae.load_model(tmp_path)
    assert loaded.spec == model.spec and loaded.config == model.config
    assert not loaded.training
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert vae.evaluate(loaded, y, iw_samples=5) == vae.evaluate(model, y, iw_samples=5)
    manifest = vae.read_manifest(tmp_path)
    assert manifest["metadata"] == {"run": "r1"} and manifest["train"]["epochs"] == 3
    assert manifest["table"]["names"] == ["a", "b", "c", "d"]
    with open(tmp_path / store.HISTORY) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[0]["val_elbo"]) == pytest.approx(result.history[0].val_elbo)


def test_files_load_with_weights_only(tmp_path, trained):
    model, cfg, result, _ = trained
    store.save_model(tmp_path, model, cfg, result.history)
    store.save_checkpoint(tmp_path, result.state)
    weights = torch.load(tmp_path / store.WEIGHTS, weights_only=True)
    assert set(weights) == set(model.state_dict())
    checkpoint = torch.load(tmp_path / store.CHECKPOINT, weights_only=True)
    assert checkpoint["epoch"] == 3
    state = vae.load_checkpoint(tmp_path)
    untimed = [{**h, "seconds": 0.0} for h in result.state.history]  # no wall-clock time in files
    assert state.history == untimed and state.step == result.state.step
    assert any(h["seconds"] > 0 for h in result.state.history)  # the live state keeps it
    for key, value in result.state.model.items():
        assert torch.equal(state.model[key], value)


class _Payload:
    """Unpickling this would run code (touch a file)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_load_model_executes_no_pickled_code(tmp_path, trained):
    model, cfg, _, _ = trained
    store.save_model(tmp_path, model, cfg)
    marker = tmp_path / "code_ran"
    torch.save({"x": _Payload(marker)}, tmp_path / store.WEIGHTS)
    with pytest.raises(vae.ModelDirError, match="weights.pt"):
        vae.load_model(tmp_path)
    assert not marker.exists()


def test_unfinished_directory_points_to_resume(tmp_path, trained):
    _, _, result, _ = trained
    store.save_checkpoint(tmp_path, result.state)
    with pytest.raises(vae.ModelDirError, match="--resume") as err:
        vae.load_model(tmp_path)
    assert str(tmp_path) in str(err.value) and "model.json" in str(err.value)


def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(vae.ModelDirError, match="does not exist") as err:
        vae.load_model(missing)
    assert str(missing) in str(err.value)


def test_empty_directory_has_no_resume_hint(tmp_path):
    with pytest.raises(vae.ModelDirError, match="model.json is missing") as err:
        vae.load_model(tmp_path)
    assert "--resume" not in str(err.value)


def test_weights_that_do_not_match_the_manifest(tmp_path, trained):
    model, cfg, _, _ = trained
    store.save_model(tmp_path, model, cfg)
    manifest = json.loads((tmp_path / store.MANIFEST).read_text())
    manifest["model"]["latent_dim"] = 3
    (tmp_path / store.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(vae.ModelDirError, match="does not match"):
        vae.load_model(tmp_path)


def test_corrupt_and_foreign_files_are_model_dir_errors(tmp_path, trained):
    model, cfg, _, _ = trained
    store.save_model(tmp_path, model, cfg)
    (tmp_path / store.WEIGHTS).write_bytes(b"not a torch file")
    with pytest.raises(vae.ModelDirError, match="not a readable"):
        vae.load_model(tmp_path)
    (tmp_path / store.MANIFEST).write_text("{broken")
    with pytest.raises(vae.ModelDirError, match="unreadable"):
        vae.load_model(tmp_path)
    (tmp_path / store.MANIFEST).write_text(json.dumps({"format": 99}))
    with pytest.raises(vae.ModelDirError, match="format 99"):
        vae.load_model(tmp_path)


def test_write_atomic_leaves_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    store.write_atomic(target, b"old contents")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        store.write_atomic(target, b"new contents that never land")
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]  # no temporary left behind


def test_write_atomic_cleans_up_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "file.bin"

    def fail(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="I/O error"):
        store.write_atomic(target, b"data")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    monkeypatch.undo()
    store.write_atomic(target, b"data")
    assert target.read_bytes() == b"data"


def test_a_model_saved_before_noise_by_z_existed_loads_without_the_head(tmp_path):
    y = torch.randn(60, 3, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    old = vae.VAE(vae.describe_table(y), vae.ModelConfig(latent_dim=1, hidden_dims=(4,), noise_by_z=False))
    store.save_model(tmp_path, old, vae.TrainConfig(epochs=1), ())
    manifest = json.loads((tmp_path / store.MANIFEST).read_text())
    del manifest["model"]["noise_by_z"]  # as written before the key existed
    (tmp_path / store.MANIFEST).write_text(json.dumps(manifest))
    loaded = vae.load_model(tmp_path)
    assert not loaded.config.noise_by_z and not loaded.decoder.by_z
    assert vae.evaluate(loaded, y, iw_samples=5) == vae.evaluate(old, y, iw_samples=5)


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    """SIGKILL between the temporary and the rename (what torchrun's SIGTERM does to a rank mid-checkpoint)."""
    target = tmp_path / store.CHECKPOINT
    writer = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; from vae import atomic\n"
        "os.fsync = lambda fd: (print('writing', flush=True), time.sleep(600))\n"
        f"atomic.write_atomic(atomic.Path({str(target)!r}), b'never lands')")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
    writer.kill()
    writer.wait()
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(f".{store.CHECKPOINT}.vaepipe-{writer.pid}-")
    live = tmp_path / f"{atomic.temp_prefix(target)}x.tmp"  # a writer that still runs (this process)
    live.write_bytes(b"")
    store.write_atomic(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([store.CHECKPOINT, live.name])


def test_an_older_model_directory_loads_through_the_migration(tmp_path):
    """A format-1 directory (no linear paths, before model.noise_by_z): its manifest names neither key,
    and the model it describes is built as it was trained, not with today's defaults (both true)."""
    y = torch.randn(100, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    old = vae.VAE(vae.describe_table(y), vae.ModelConfig(latent_dim=2, hidden_dims=(8,), linear_path=False,
                                                         noise_by_z=False))
    store.save_model(tmp_path, old, vae.TrainConfig(device="cpu"))
    manifest = json.loads((tmp_path / store.MANIFEST).read_text())
    manifest["format"] = 1
    del manifest["model"]["linear_path"], manifest["model"]["noise_by_z"]
    (tmp_path / store.MANIFEST).write_text(json.dumps(manifest))
    migrated = store.migrate_manifest(manifest)
    assert migrated["format"] == store.FORMAT and manifest["format"] == 1  # the manifest read is left alone
    assert (migrated["model"]["linear_path"], migrated["model"]["noise_by_z"]) == (False, False)
    loaded = vae.load_model(tmp_path)
    assert loaded.config == old.config and vae.ModelConfig().linear_path and vae.ModelConfig().noise_by_z
    assert vae.evaluate(loaded, y, iw_samples=5) == vae.evaluate(old, y, iw_samples=5)
