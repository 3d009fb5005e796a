"""Model directories: weights, config, table spec, history and resumable training state.

Layout of DIR:
  model.json      manifest: format, model and train config, table spec, caller's metadata.
                  Written last: a directory without it holds no finished model.
  weights.pt      state_dict of the final (best) weights, loaded with weights_only=True
  history.csv     one row per epoch
  checkpoint.pt   TrainState of the last finished epoch (resume); kept after training
Every file is written to a temporary name in DIR and renamed into place.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from vae.config import ModelConfig, TrainConfig
from vae.errors import ModelDirError
from vae.model import VAE
from vae.table import TableSpec
from vae.train import EpochStats, TrainState

FORMAT = 1
MANIFEST, WEIGHTS, HISTORY, CHECKPOINT = "model.json", "weights.pt", "history.csv", "checkpoint.pt"


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelDirError(f"{path} is missing") from None
    except Exception as exc:  # corrupt or foreign file
        raise ModelDirError(f"{path} is not a readable vaepipe file: {exc}") from None


def history_csv(history: Sequence[EpochStats]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[f.name for f in fields(EpochStats)], lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
    return out.getvalue().encode()


def save_checkpoint(directory: Path, state: TrainState) -> None:
    write_atomic(Path(directory) / CHECKPOINT, _torch_bytes(state.to_dict()))


def load_checkpoint(directory: Path) -> TrainState:
    return TrainState.from_dict(_load_torch(Path(directory) / CHECKPOINT))


def save_model(
    directory: Path,
    model: VAE,
    train_config: TrainConfig | None = None,
    history: Sequence[EpochStats] = (),
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write a finished model; the manifest goes last, so the directory is complete or not a model."""
    directory = Path(directory)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomic(directory / WEIGHTS, _torch_bytes(state))
    write_atomic(directory / HISTORY, history_csv(history))
    manifest = {
        "format": FORMAT,
        "model": asdict(model.config),
        "train": None if train_config is None else asdict(train_config),
        "table": model.spec.to_dict(),
        "metadata": dict(metadata or {}),
    }
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2).encode())


def read_manifest(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ModelDirError(f"model directory {directory} does not exist")
    if not path.exists():
        hint = " (an interrupted training run: continue it with --resume)" if (directory / CHECKPOINT).exists() else ""
        raise ModelDirError(f"{directory} holds no finished model: {MANIFEST} is missing{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{path} is unreadable: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ModelDirError(f"{path} has format {manifest.get('format')!r}; this vaepipe reads {FORMAT}")
    return manifest


def load_model(directory: Path, device: str | torch.device = "cpu") -> VAE:
    """Rebuild the VAE of a model directory; no pickled code is executed."""
    manifest = read_manifest(directory)
    config = ModelConfig(**manifest["model"])
    model = VAE(TableSpec.from_dict(manifest["table"]), config)
    try:
        model.load_state_dict(_load_torch(Path(directory) / WEIGHTS))
    except RuntimeError as exc:
        raise ModelDirError(f"{Path(directory) / WEIGHTS} does not match {MANIFEST}: {exc}") from None
    return model.to(device).eval()
