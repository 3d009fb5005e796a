"""The register stage: log a model directory to MLflow as a new version of register.model_name,
then, with promote, the gate (pipeline.registry.gate), which alone moves @champion."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pipeline import stores
from pipeline.config import Params
from pipeline.errors import GateRefused, PipelineError

ALIAS = re.compile(r"[\w-]{1,255}")  # what MLflow takes as an alias name
RESERVED_ALIAS = re.compile(r"latest|v\d+", re.IGNORECASE)  # MLflow's own: the newest version, version numbers


def run(model_dir: Path, params: Params, *, alias: str | None = "challenger",
        metrics: dict[str, Any] | None = None, table: Path | None = None,
        tags: dict[str, str] | None = None) -> Any:
    """`vaepipe register`: alias None: no alias (a DVC experiment's model); tags: extra version tags."""
    if alias is not None:
        check_alias(alias)
    stores.check_store()  # before the slow imports: a dead server fails in seconds
    from pipeline.registry.register import register_model

    return register_model(Path(model_dir), params, alias=alias, metrics=metrics, table=table, tags=tags)


def check_alias(alias: str) -> str:
    """An alias `register` may set: MLflow's characters, not reserved, and never @champion, which
    only the promotion gate moves."""
    if not ALIAS.fullmatch(alias) or RESERVED_ALIAS.fullmatch(alias):
        raise PipelineError(f"--alias {alias!r}: an alias is 1 to 255 letters, digits, '_' or '-', and not "
                            "'latest' or v<number> (MLflow's own names); e.g. --alias challenger")
    if alias == "champion":
        raise PipelineError("--alias champion: only the promotion gate moves @champion; register as a challenger "
                            "and add --promote (or run `vaepipe promote`)")
    return alias


def promote(params: Params, *, version: str | None = None, data: Path | None = None,
            refuse_raises: bool = True) -> dict[str, Any]:
    """`vaepipe promote`, the gate; a refusal raises GateRefused unless refuse_raises is False
    (then it is reported)."""
    stores.check_store()
    from pipeline.registry import gate

    try:
        result = gate.promote(params, Path(data) if data else default_eval_table(params), version=version)
    except GateRefused as exc:
        if refuse_raises:
            raise
        return {"promoted": False, "message": str(exc), **_gate_figures(exc.promotion)}
    return {"promoted": result.promoted, "message": result.message, **_gate_figures(result)}


def default_eval_table(params: Params) -> Path:
    path = Path(params.data.prepared_dir) / "test.parquet"
    if not path.exists():
        raise PipelineError(f"no evaluation table: {path} does not exist (run `dvc repro` or pass --data)")
    return path


def _gate_figures(result: Any) -> dict[str, Any]:
    """The versions and held-out log-likelihoods (nats/row) the gate compared; {} when it scored none."""
    if result is None:
        return {}
    keys = ("challenger_version", "champion_version", "challenger_log_likelihood", "champion_log_likelihood",
            "required")
    return {k: getattr(result, k) for k in keys}


def decision_line(promotion: dict[str, Any], margin: float = 0.0) -> str:
    """The gate's decision in one line: "promoted v3 over v2 (x > y nats/row)" or "refused: ..."."""
    new, old = promotion.get("challenger_version"), promotion.get("champion_version")
    ll_new, ll_old = promotion.get("challenger_log_likelihood"), promotion.get("champion_log_likelihood")
    plus = f" + {margin:g}" if margin else ""
    if promotion.get("promoted") and ll_old is not None:
        return f"promoted v{new} over v{old} ({ll_new:.3f} > {ll_old:.3f}{plus} nats/row held out)"
    if new is not None and new == old:
        return f"v{new} is already @champion: nothing moved"
    if promotion.get("promoted"):
        return f"promoted v{new}, the first champion ({ll_new:.3f} nats/row held out)"
    if ll_new is not None and ll_old is not None:
        return (f"refused: v{new} scores {ll_new:.3f} nats/row held out, not above v{old}'s {ll_old:.3f}{plus}; "
                f"@champion stays v{old}")
    return f"refused: {promotion.get('message', '')}".replace("refused: promotion refused: ", "refused: ")


def registration_json(name: str, version: str, experiment: str | None = None) -> bytes:
    """reports/registered.json: what `vaepipe register --output` and the flow write.

    No run id: a DVC out holds what a rerun reproduces (the version's run is in the registry).
    experiment: the DVC experiment that registered the version (it has no alias).
    """
    body = {"name": name, "version": version} | ({"experiment": experiment} if experiment else {})
    return json.dumps(body).encode()


def dvc_experiment() -> dict[str, str] | None:
    """The DVC experiment this process runs in, as version tags; None outside one.

    `dvc exp run` sets DVC_EXP_NAME and DVC_EXP_BASELINE_REV in its stages' environment (`dvc repro`
    sets only DVC_ROOT and DVC_STAGE), so an experiment's register stage can keep the registry's
    aliases, which production reads, where they are."""
    name = os.environ.get("DVC_EXP_NAME", "").strip()
    if not name:
        return None
    return {"dvc_experiment": name, "dvc_experiment_baseline": os.environ.get("DVC_EXP_BASELINE_REV", "")}
