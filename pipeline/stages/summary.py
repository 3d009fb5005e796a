"""`vaepipe summary`: what the last pipeline run gave, in a few lines (reports/ and the registry)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pipeline import stores
from pipeline.errors import PipelineError

PLOTS = "dvc_plots/index.html"  # where `dvc plots show` writes


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist: run the pipeline first (`make run` or `dvc repro`), "
                            f"or give {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path} is not readable JSON ({exc.__class__.__name__}); run the pipeline again") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path} is not a JSON object; run the pipeline again")
    return data


def _nats(value: Any) -> str:
    return "n/a" if not isinstance(value, int | float) else f"{value:.3f}"


def metrics_lines(metrics: dict[str, Any]) -> list[str]:
    """The held-out log-likelihood, the full Gaussian beside it and what the VAE adds (nats/row)."""
    ll, stderr = metrics.get("log_likelihood"), metrics.get("log_likelihood_stderr")
    err = "" if not isinstance(stderr, int | float) else f" ± {stderr:.3f}"
    rows = f" on {metrics['n_rows']} held-out rows" if isinstance(metrics.get("n_rows"), int) else ""
    lines = [f"log-likelihood: {_nats(ll)}{err} nats/row{rows} (IWAE, K = {metrics.get('iw_samples')})"]
    full = (metrics.get("baselines") or {}).get("full_gauss")
    if isinstance(ll, int | float) and isinstance(full, int | float):
        lines.append(f"  full-covariance Gaussian: {full:.3f} nats/row; the VAE adds {ll - full:+.3f} nats/row")
    return lines


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store (a server URI is opened as it is)."""
    if urlsplit(uri).scheme in ("http", "https"):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def _local_path(uri: str) -> Path | None:
    parts = urlsplit(uri)
    return Path(unquote(parts.path)) if parts.scheme == "file" else None


def registry_lines(name: str, version: str | None) -> list[str]:
    """The registered version (its run, plots, the gate's decision), @champion, and the UI command."""
    from mlflow import MlflowClient

    from pipeline.registry.register import held_out
    from pipeline.registry.versions import CHAMPION, current_champion, resolve_version

    uri = stores.check_store()
    db = stores.sqlite_path(uri)
    if db is not None and not db.exists():
        raise PipelineError(f"there is no MLflow store at {db}: run the pipeline first (`make run`), "
                            "or point MLFLOW_TRACKING_URI at your store")
    stores.configure_tracking()
    client = MlflowClient()
    lines: list[str] = []
    run = None
    if version is not None:
        mv = resolve_version(f"models:/{name}/{version}")
        run = client.get_run(mv.run_id) if mv.run_id else None
        lines.append(f"model: registered as models:/{name}/{version}"
                     + (f" (MLflow run {run.info.run_name!r})" if run is not None else "") + _gate(mv.tags))
    champion = current_champion(name)
    if champion is None:
        lines.append(f"@{CHAMPION}: none yet (`vaepipe promote` moves it behind the gate)")
    else:
        cv = client.get_model_version(name, champion)
        ll = cv.tags.get("log_likelihood")
        value = float(ll) if ll is not None else None
        if value is None and cv.run_id:
            value = held_out(client.get_run(cv.run_id).data.metrics, "log_likelihood")  # test_ or, older, bare
        mine = " (this run's model)" if champion == version else ""
        lines.append(f"@{CHAMPION}: models:/{name}/{champion}{mine}, held-out log-likelihood {_nats(value)} nats/row "
                     "when registered")
    if run is not None:
        plots = _local_path(f"{run.info.artifact_uri}/plots")
        lines.append(f"plots: {plots if plots is not None else run.info.artifact_uri + '/plots'} "
                     "(loss curves, per-feature reconstruction, latent means, traversals)")
    url = "" if run is None else f"; then http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    lines.append(f"MLflow UI: {ui_command(uri)}{url}")
    return lines


def _gate(tags: dict[str, str]) -> str:
    result = tags.get("gate_result")
    if result is None and tags.get("dvc_experiment"):  # registered with no alias: the gate never ran
        return (f"; DVC experiment {tags['dvc_experiment']}, no alias moved "
                "(`vaepipe promote --version V` gates it on purpose)")
    if result is None:
        return ""
    if result == "promoted" and "gate_champion_version" in tags:
        return (f"; promoted over version {tags['gate_champion_version']} ({float(tags['gate_log_likelihood']):.3f} > "
                f"{float(tags['gate_champion_log_likelihood']):.3f} nats/row held out)")
    if result == "refused" and "gate_champion_version" in tags:
        return (f"; refused by the gate ({float(tags['gate_log_likelihood']):.3f}, not above "
                f"{float(tags['gate_required']):.3f} nats/row for version {tags['gate_champion_version']})")
    return f"; {result} by the gate"


def summary_lines(metrics_path: Path, registered_path: Path, model_dir: Path, default_name: str) -> list[str]:
    metrics = _read_json(metrics_path, "--metrics")
    registered = _read_json(registered_path, "--registered") if registered_path.exists() else {}
    lines = metrics_lines(metrics)
    if model_dir.exists():
        lines.append(f"model directory: {model_dir}")
    lines += registry_lines(str(registered.get("name", default_name)),
                            None if registered.get("version") is None else str(registered["version"]))
    if Path("dvc.yaml").exists():
        lines.append(f"training curves: `dvc plots show` writes {PLOTS}")
    return lines
