"""A truncated or foreign weights.pt, baselines.pt or checkpoint.pt: one line that names the file
and says what to do, exit 2, never a traceback (CLI in process, real torch files)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from tests.pipeline.helpers import FAST, clean_table

ARGS = [a for s in [*FAST, "train.epochs=2", "train.refit=false", "data.id_columns=[sample_id]"] for a in ("--set", s)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("model-files")
    clean_table(seed=1).to_parquet(root / "train.parquet", index=False)
    assert main(["train", str(root / "train.parquet"), "--out", str(root / "model"), *ARGS]) == 0
    return root / "train.parquet", root / "model"


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _pickled_module(path: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), path)  # a whole module: refused by weights_only loading


def _other_state(path: Path) -> None:
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)


def _other_checkpoint(path: Path) -> None:
    torch.save({"epoch": 3, "model": {}}, path)


def _one_error_line(capsys: pytest.CaptureFixture[str], code: int, path: Path, todo: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("vaepipe: error: ") and str(path) in err and todo in err, err
    return err


@pytest.mark.parametrize("name", ["weights.pt", "baselines.pt"])
@pytest.mark.parametrize("damage", [_truncated, _pickled_module, _other_state])
def test_a_bad_model_file_is_named_with_what_to_do(trained: tuple[Path, Path], tmp_path: Path, name: str,
                                                    damage: Callable[[Path], None],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    table, model = trained
    broken = shutil.copytree(model, tmp_path / "model")
    damage(broken / name)
    capsys.readouterr()
    code = main(["evaluate", str(broken), str(table), *ARGS])
    _one_error_line(capsys, code, broken / name, "train it again")
    assert not list(tmp_path.glob("out*"))


def _interrupted(trained: tuple[Path, Path], folder: Path) -> Path:
    """A run killed after its last checkpoint: run.json and checkpoint.pt, no finished model."""
    shutil.copytree(trained[1], folder)
    for name in ("model.json", "weights.pt", "history.csv", "baselines.pt"):
        (folder / name).unlink()
    return folder


@pytest.mark.parametrize("damage", [_truncated, _pickled_module, _other_state, _other_checkpoint])
def test_a_bad_checkpoint_is_named_and_resume_says_what_to_do(trained: tuple[Path, Path], tmp_path: Path,
                                                               damage: Callable[[Path], None],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = _interrupted(trained, tmp_path / "run")
    damage(run / "checkpoint.pt")
    capsys.readouterr()
    code = main(["train", str(trained[0]), "--out", str(run), "--resume", *ARGS])
    _one_error_line(capsys, code, run / "checkpoint.pt", "train again without --resume")
    assert not (run / "model.json").exists()


def test_a_checkpoint_of_another_model_is_refused_before_training(trained: tuple[Path, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = _interrupted(trained, tmp_path / "run")
    other = tmp_path / "other"
    wide = [*ARGS, "--set", "model.hidden_dims=[8]"]
    assert main(["train", str(trained[0]), "--out", str(other), *wide]) == 0
    shutil.copy(other / "checkpoint.pt", run / "checkpoint.pt")  # same params in run.json, another net
    capsys.readouterr()
    code = main(["train", str(trained[0]), "--out", str(run), "--resume", *ARGS])
    err = _one_error_line(capsys, code, run / "checkpoint.pt", "train again without --resume")
    assert "does not fit this run's model" in err
