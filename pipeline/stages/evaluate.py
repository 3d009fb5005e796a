"""The evaluate stage: the metrics JSON (README "The metrics") for a model on a table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from pipeline.config import EvaluateParams, Params
from pipeline.contract.model import LoadedModel
from pipeline.io.tables import read_table
from pipeline.registry.resolve import resolve_model
from vae import evaluate, load_baselines
from vae.store import write_atomic
from vae.terms import TERMS


def metrics_dict(model: LoadedModel, data_path: Path, params: EvaluateParams) -> dict[str, Any]:
    """ELBO, its terms and IWAE log-likelihood in nats per row, original units."""
    y = model.features(read_table(Path(data_path)), str(data_path))
    ev = evaluate(model.vae, y, params.iw_samples, params.seed, params.batch_rows)
    stderr = ev.log_likelihood_stderr
    return {
        "n_rows": ev.n_rows,
        **{t.key: getattr(ev, t.key) for t in TERMS},  # elbo, reconstruction, kl
        "log_likelihood": ev.log_likelihood,
        "log_likelihood_stderr": None if math.isnan(stderr) else stderr,
        "iw_samples": ev.iw_samples,
        "kl_per_dim": list(ev.kl_per_dim),
        "active_units": ev.active_units,
        "per_feature_reconstruction": dict(zip(model.schema.features, ev.per_feature_reconstruction, strict=True)),
        "baselines": baseline_metrics(model, y),
    }


def baseline_metrics(model: LoadedModel, y: torch.Tensor) -> dict[str, float] | None:
    """The closed-form baselines fitted on the model's training rows, scored on these rows."""
    fitted = load_baselines(model.directory)
    if fitted is None:
        return None
    return {name: float(ll.mean()) for name, ll in fitted.log_prob(y).items()}


def metrics_json(metrics: dict[str, Any]) -> str:
    """Strict JSON: a non-finite number (a row whose density underflowed) is written as null."""
    return json.dumps(_finite(metrics), indent=2, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_metrics(metrics: dict[str, Any], path: Path) -> None:
    write_atomic(Path(path), (metrics_json(metrics) + "\n").encode())


def run(model: str, path: Path, params: Params, json_path: Path | None = None) -> dict[str, Any]:
    """`vaepipe evaluate`: the metrics JSON of MODEL on the table at PATH, also written to json_path."""
    metrics = metrics_dict(resolve_model(model), Path(path), params.evaluate)
    if json_path is not None:
        write_metrics(metrics, Path(json_path))
    return metrics
