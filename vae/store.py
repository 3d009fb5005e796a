"""Model directories: weights, config, table spec, history and resumable training state.

Layout of DIR:
  model.json      manifest: format, model and train config, table spec, caller's metadata.
                  Written last: a directory without it holds no finished model.
  weights.pt      state_dict of the final (best) weights, loaded with weights_only=True
  history.csv     one row per epoch
  checkpoint.pt   TrainState of the last finished epoch (resume); kept after training
  baselines.pt    closed-form baselines fitted on the training rows (vae.baselines), if any
Every file is written to a temporary name in DIR and renamed into place (vae.atomic; a killed
writer's temporary is removed by the next write of that file). No file holds wall-clock
time: identical runs give byte-identical directories (DVC hashes them).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from vae.atomic import write_atomic
from vae.baselines import Baselines
from vae.config import ModelConfig, TrainConfig, config_from_dict
from vae.errors import ConfigError, ModelDirError
from vae.model import VAE
from vae.table import TableSpec
from vae.train import EpochStats, TrainState

FORMAT = 2  # 2: linear paths beside the MLPs; format 1 directories load without them
READABLE = (1, 2)
MANIFEST, WEIGHTS, HISTORY, CHECKPOINT = "model.json", "weights.pt", "history.csv", "checkpoint.pt"
BASELINES = "baselines.pt"


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


RESTORE = "restore the model directory (e.g. `dvc pull`) or train it again"
RESTART = "delete the directory and train again without --resume"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    line = (lines[0] if lines else exc.__class__.__name__).split(". ")[0]
    return line if len(line) <= 120 else line[:117] + "..."


def _load_torch(path: Path, todo: str = RESTORE) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelDirError(f"{path} is missing; {todo}") from None
    except Exception as exc:  # truncated, corrupt or foreign (pickled code is refused by weights_only)
        raise ModelDirError(f"{path} is not a readable vaepipe file ({_first_line(exc)}); {todo}") from None


def weights_mismatch(model: VAE, state: Any) -> str | None:
    """Why state cannot be model's state_dict (one phrase), or None when every name and shape fits."""
    expected = model.state_dict()
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return f"it holds a {type(state).__name__}, not a mapping of weight tensors"
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        return (f"it holds other weights ({len(missing)} missing, e.g. {(missing or ['-'])[0]!r}; "
                f"{len(unexpected)} unexpected, e.g. {(unexpected or ['-'])[0]!r})")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            return f"{key} has shape {list(state[key].shape)} where {MANIFEST} implies {list(value.shape)}"
    return None


TIMING_FIELDS = ("seconds",)  # wall-clock: reported live, never written to a file
LIVE_FIELDS = ("stage_epochs", "noise_opened", "stage_over")  # for progress lines; the model's metadata keeps the events


def history_csv(history: Sequence[EpochStats]) -> bytes:
    """One row per epoch; `epoch` restarts in the refit, `total_epoch` counts on over both stages."""
    out = io.StringIO()
    names = ["total_epoch", *(f.name for f in fields(EpochStats)
                               if f.name not in ("total_epoch", *TIMING_FIELDS, *LIVE_FIELDS))]
    writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for i, row in enumerate(history):  # by position: a checkpoint of older code has no total_epoch
        writer.writerow({**{k: "" if v is None else v for k, v in asdict(row).items()}, "total_epoch": i + 1})
    return out.getvalue().encode()


def save_checkpoint(directory: Path, state: TrainState) -> None:
    """The state with its epochs' wall-clock seconds zeroed, so that identical runs write identical bytes."""
    d = dict(state.to_dict())
    d["history"] = [{**h, **dict.fromkeys(TIMING_FIELDS, 0.0)} for h in d["history"]]
    write_atomic(Path(directory) / CHECKPOINT, _torch_bytes(d))


def load_checkpoint(directory: Path, model: VAE | None = None) -> TrainState:
    """The TrainState of an interrupted run; with model, also checked to fit that model."""
    path = Path(directory) / CHECKPOINT
    raw = _load_torch(path, RESTART)
    names = {f.name for f in fields(TrainState)}
    if not isinstance(raw, dict) or not set(raw) <= names or "model" not in raw:
        raise ModelDirError(f"{path} is not a vaepipe training checkpoint; {RESTART}")
    switching = not raw["model"] and raw.get("phase") == "refit"  # saved as the refit began: no weights yet
    why = None if model is None or switching else weights_mismatch(model, raw["model"])
    if why is not None:
        raise ModelDirError(f"{path} does not fit this run's model: {why}; {RESTART}")
    return TrainState.from_dict(raw)


def save_model(
    directory: Path,
    model: VAE,
    train_config: TrainConfig | None = None,
    history: Sequence[EpochStats] = (),
    metadata: Mapping[str, Any] | None = None,
    baselines: Baselines | None = None,
) -> None:
    """Write a finished model; the manifest goes last, so the directory is complete or not a model."""
    directory = Path(directory)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomic(directory / WEIGHTS, _torch_bytes(state))
    if baselines is not None:
        write_atomic(directory / BASELINES, _torch_bytes(baselines.to_dict()))
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
        raise ModelDirError(f"{path} is unreadable ({_first_line(exc)}); {RESTORE}") from None
    if not isinstance(manifest, dict):
        raise ModelDirError(f"{path} holds a JSON {type(manifest).__name__}, not a vaepipe manifest; {RESTORE}")
    if manifest.get("format") not in READABLE:
        raise ModelDirError(f"{path} has format {manifest.get('format')!r}; this vaepipe reads {READABLE}")
    for key in ("model", "table"):
        if not isinstance(manifest.get(key), dict):
            raise ModelDirError(f"{path} has no {key!r} section (a JSON object); {RESTORE}")
    return manifest


def load_baselines(directory: Path) -> Baselines | None:
    """The baselines saved with a model, or None (a model saved without them)."""
    path = Path(directory) / BASELINES
    if not path.exists():
        return None
    raw = _load_torch(path)
    try:
        return Baselines.from_dict(raw)
    except TypeError:  # a mapping with other names, or no mapping at all
        raise ModelDirError(f"{path} is not a vaepipe baselines file; {RESTORE}") from None


def migrate_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest of any READABLE format in today's terms: the one place where what an older model
    directory left out is filled in with what it meant when it was written (a new default does not
    apply to a model trained before the key existed). A new key of the model section adds its line here."""
    out = {**manifest, "model": dict(manifest["model"])}
    model = out["model"]
    if manifest["format"] == 1:  # before format 2 there were no linear paths beside the MLPs
        model.setdefault("linear_path", False)
    model.setdefault("noise_by_z", False)  # saved before model.noise_by_z existed: no z-dependent head
    out["format"] = FORMAT
    return out


def _build(manifest: dict[str, Any], path: Path) -> VAE:
    model_dict = migrate_manifest(manifest)["model"]
    try:
        config = config_from_dict(ModelConfig, "model", model_dict)
    except ConfigError as exc:
        raise ModelDirError(f"{path}: {exc}; {RESTORE}") from None
    try:
        return VAE(TableSpec.from_dict(manifest["table"]), config)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as exc:
        raise ModelDirError(f"{path}: its 'table' section is not valid ({_first_line(exc)}); {RESTORE}") from None


def load_model(directory: Path, device: str | torch.device = "cpu") -> VAE:
    """Rebuild the VAE of a model directory; no pickled code is executed."""
    manifest = read_manifest(directory)
    model = _build(manifest, Path(directory) / MANIFEST)
    path = Path(directory) / WEIGHTS
    state = _load_torch(path)
    why = weights_mismatch(model, state)
    if why is not None:
        raise ModelDirError(f"{path} does not match {MANIFEST}: {why}; was {MANIFEST} edited? {RESTORE}")
    model.load_state_dict(state)
    return model.to(device).eval()
