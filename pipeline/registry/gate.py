"""The promotion gate: @challenger becomes @champion only if its held-out log-likelihood beats the
champion's on the same table by register.min_improvement; with no champion yet, a challenger
whose table passes validation against it. Otherwise nothing moves (GateRefused, exit 1).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from pipeline import stores
from pipeline.config import Params
from pipeline.contract.model import LoadedModel
from pipeline.errors import GateRefused, PipelineError, ValidationFailed
from pipeline.io.tables import read_table
from pipeline.registry.champion import contract_error, contract_frame, version_model
from pipeline.registry.locks import promotion_lock
from pipeline.registry.versions import CHALLENGER, CHAMPION, registered_aliases, resolve_version
from pipeline.stages.evaluate import metrics_dict
from pipeline.stages.validate import validate_table


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    challenger_version: str
    champion_version: str | None  # before the gate
    challenger_log_likelihood: float | None
    champion_log_likelihood: float | None
    required: float | None  # the champion's log-likelihood + register.min_improvement
    message: str


def promote(params: Params, data_path: Path, *, version: str | None = None) -> Promotion:
    """Move @champion to the challenger if its log-likelihood on DATA beats the champion's."""
    stores.configure_tracking()
    name, data_path = params.register.model_name, Path(data_path)
    challenger = _challenger(name, version)
    with promotion_lock(name):  # held from reading @champion to moving it (pipeline.registry.locks)
        return _gate(params, challenger, data_path)


def _gate(params: Params, challenger: str, data_path: Path) -> Promotion:
    name = params.register.model_name
    champion = registered_aliases(MlflowClient(), name, f"models:/{name}").get(CHAMPION)
    if champion == challenger:
        return Promotion(False, challenger, champion, None, None, None,
                         f"version {challenger} of {name} is already @{CHAMPION}; nothing to do")
    if champion is None:
        return _first_champion(params, challenger, data_path)
    return _against_champion(params, challenger, champion, data_path)


def _challenger(name: str, version: str | None) -> str:
    if version is not None:
        return str(resolve_version(f"models:/{name}/{version}").version)
    try:
        return str(resolve_version(f"models:/{name}@{CHALLENGER}").version)
    except PipelineError as exc:
        raise PipelineError(f"no challenger: run vaepipe register first ({exc})") from None


def _log_likelihood(model: LoadedModel, data_path: Path, params: Params, who: str) -> float:
    try:
        return float(metrics_dict(model, data_path, params.evaluate)["log_likelihood"])
    except PipelineError as exc:
        raise PipelineError(f"{who} cannot be evaluated on {data_path}: {exc}") from None


def _against_champion(params: Params, challenger: str, champion: str, data_path: Path) -> Promotion:
    """The gate: the challenger must beat the champion by register.min_improvement on the same table."""
    name, margin = params.register.model_name, params.register.min_improvement
    new_model, old_model = version_model(name, challenger), version_model(name, champion)
    problems = old_model.schema.problems(contract_frame(new_model.schema))
    if problems:  # registered before registration checked it: no gate between two tables
        raise contract_error(f"version {challenger} of {name}", name, champion, old_model.schema, problems,
                              params.data.source, "on one table; nothing moves")
    ll_new = _log_likelihood(new_model, data_path, params, f"challenger version {challenger}")
    ll_old = _log_likelihood(old_model, data_path, params, f"champion version {champion}")
    required = ll_old + margin
    tags = {"gate_champion_version": champion, "gate_champion_log_likelihood": repr(ll_old),
            "gate_required": repr(required)}
    if not (math.isfinite(ll_new) and ll_new > required):
        _tag(name, challenger, {**_gate_tags(ll_new, data_path, "refused"), **tags})
        message = (f"promotion refused: version {challenger} of {name} scores log-likelihood {ll_new:.4f} nats/row "
                   f"on {data_path}, which does not beat champion version {champion} ({ll_old:.4f}) + "
                   f"register.min_improvement {margin:g} = {required:.4f}; @{CHAMPION} stays on version {champion}")
        raise GateRefused(message, Promotion(False, challenger, champion, ll_new, ll_old, required, message))
    _crown(name, challenger, champion, {**_gate_tags(ll_new, data_path, "promoted"), **tags})
    return Promotion(True, challenger, champion, ll_new, ll_old, required,
                     f"version {challenger} of {name} is now @{CHAMPION}: log-likelihood {ll_new:.4f} > "
                     f"{ll_old:.4f} (version {champion}) + {margin:g} on {data_path}")


def _first_champion(params: Params, challenger: str, data_path: Path) -> Promotion:
    """No champion yet: DATA must pass validation against the challenger, whose likelihood must be finite."""
    name = params.register.model_name
    model = version_model(name, challenger)
    report = validate_table(read_table(data_path), data=params.data, params=params.validate,
                            against=model.schema, where=str(data_path))
    if not report.success:
        failed = [c.line() for c in report.failures()]
        raise ValidationFailed(f"promotion refused: {data_path} fails validation against version "
                               f"{challenger} of {name}: {'; '.join(failed[:5])}")
    ll_new = _log_likelihood(model, data_path, params, f"challenger version {challenger}")
    if not math.isfinite(ll_new):
        _tag(name, challenger, _gate_tags(ll_new, data_path, "refused"))
        message = (f"promotion refused: version {challenger} of {name} scores a non-finite "
                   f"log-likelihood ({ll_new}) on {data_path}")
        raise GateRefused(message, Promotion(False, challenger, None, ll_new, None, None, message))
    _crown(name, challenger, None, {**_gate_tags(ll_new, data_path, "promoted"), "validation_status": "passed"})
    return Promotion(True, challenger, None, ll_new, None, None,
                     f"version {challenger} of {name} is now @{CHAMPION} (there was none): validation of "
                     f"{data_path} passed, log-likelihood {ll_new:.4f} nats/row")


def _gate_tags(ll_new: float, data_path: Path, result: str) -> dict[str, str]:
    return {"gate_result": result, "gate_log_likelihood": repr(ll_new), "gate_data": str(data_path),
            "gated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _tag(name: str, version: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _crown(name: str, challenger: str, expected: str | None, tags: dict[str, str]) -> None:
    """Set @champion unless it moved while the gate ran (cannot happen under promotion_lock)."""
    client = MlflowClient()
    now = registered_aliases(client, name, f"models:/{name}").get(CHAMPION)
    if now != expected:
        raise PipelineError(f"@{CHAMPION} of {name} moved to version {now} while the gate ran; run promote again")
    _tag(name, challenger, {**tags, "promoted_at": tags["gated_at"]})
    client.set_registered_model_alias(name, CHAMPION, challenger)

