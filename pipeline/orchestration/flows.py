"""Prefect flows: they only compose tasks; every task wraps one function of a stage module
(pipeline.stages) in a few lines."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline import stores
from pipeline.config import Params, load_params
from pipeline.contract.model import load_model_dir
from pipeline.errors import user_error
from pipeline.io.outputs import parts_dir
from pipeline.io.sources import resolve_source
from pipeline.orchestration import versioning
from pipeline.orchestration.progress import TrainingProgress
from pipeline.registry.register import RegisteredVersion
from pipeline.registry.resolve import ResolvedModel, resolve_ref
from pipeline.stages import embed, evaluate, prepare, register, train, validate
from vae.store import write_atomic


def _report_artifact(key: str, title: str, report: Any, where: str) -> None:
    create_markdown_artifact(
        key=key, markdown="\n".join([f"## {title}", "", *[f"- {line}" for line in report.summary_lines()]]),
        description=where,
    )


@task(cache_policy=NO_CACHE)
def newest_table_task(params: Params) -> str:
    source = resolve_source(params.data.source)
    get_run_logger().info(f"data.source {params.data.source} -> {source}")
    return source


@task(cache_policy=NO_CACHE)  # bad data is not retried: it will not get better
def drift_task(source: str, params: Params) -> None:
    """The new table against @champion's contract and training distribution."""
    report = validate.against_champion(source, params)
    if report is None:
        get_run_logger().info("no @champion yet: no training distribution to check drift against")
        return
    _report_artifact("drift", "Against the champion", report, report.where)
    validate.raise_if_failed(report, report.where)


@task(cache_policy=NO_CACHE)
def prepare_task(params: Params) -> dict[str, Path]:
    return prepare.run(params)


@task(cache_policy=NO_CACHE)
def validate_task(path: Path | str, params: Params, report_path: Path | None = None) -> None:
    report = validate.run(path, params, report_path=report_path, raise_on_failure=False)
    _report_artifact("validation", "Validation", report, f"validation of {path}")
    validate.raise_if_failed(report, path)


@task(cache_policy=NO_CACHE)
def train_task(path: Path, out: Path, params: Params, val_path: Path | None) -> Path:
    logger = get_run_logger()
    summary = train.run(path, out, params, val_path=val_path, validated=True, on_epoch=TrainingProgress(logger.info))
    logger.info(train.result_line(summary))
    return summary.directory


@task(cache_policy=NO_CACHE)
def evaluate_task(model: str, path: Path, params: Params, json_path: Path | None) -> dict[str, Any]:
    return evaluate.run(model, path, params, json_path=json_path)


@task(cache_policy=NO_CACHE)
def compare_task(challenger: dict[str, Any], champion: dict[str, Any] | None, path: Path,
                 versions: tuple[str, str | None], decision: str) -> None:
    """One table of challenger and champion (their versions) on the same held-out rows, and the gate's decision."""
    new = f"challenger v{versions[0]}"
    old = "champion" if versions[1] is None else f"champion v{versions[1]}"
    keys = [k for k, v in challenger.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    rows = [{"metric": k, new: challenger[k], old: None if champion is None else champion.get(k)} for k in keys]
    create_table_artifact(key="metrics", table=rows,
                          description=f"{decision}. Challenger and champion on the same held-out rows {path} "
                                      "(nats per row)")


@task(cache_policy=NO_CACHE)
def champion_task(params: Params) -> str | None:
    from pipeline.registry.versions import current_champion

    return current_champion(params.register.model_name)


def _retry_unless_user_error(task: Any, run: Any, state: Any) -> bool:
    """A busy store is worth a retry; a user error (bad table, unreachable server after its own retries) is not."""
    try:
        state.result()
    except Exception as exc:
        return user_error(exc) is None  # a store down after MLflow's own bounded retries is a user error too
    return True


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],  # store access can be busy
      retry_condition_fn=_retry_unless_user_error)
def register_task(model_dir: Path, params: Params, metrics: dict[str, Any], table: Path) -> RegisteredVersion:
    return register.run(model_dir, params, metrics=metrics, table=table)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_unless_user_error)
def promote_task(params: Params, version: str, data: Path) -> dict[str, Any]:
    return register.promote(params, version=version, data=data, refuse_raises=False)


@task(cache_policy=NO_CACHE)
def install_model_task(model_dir: Path, stages: versioning.DvcStages) -> Path:
    return versioning.install_model(model_dir, stages)


@task(cache_policy=NO_CACHE)
def dvc_commit_task(stages: tuple[str, ...]) -> None:
    versioning.commit(stages)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30])  # a remote can be busy
def dvc_push_task() -> str | None:
    remote = versioning.push_if_remote()
    get_run_logger().info(f"pushed to DVC remote {remote!r}" if remote else "no default DVC remote: nothing pushed")
    return remote


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def resolve_task(model: str) -> ResolvedModel:
    return resolve_ref(model)


@task(cache_policy=NO_CACHE)
def embed_partition_task(model_dir: Path, part: Path, out_dir: Path, params: Params, model_version: str) -> int:
    """One file of the folder; on a Dask worker it loads the model directory itself (cheap)."""
    embed.use_threads(params.embed.num_threads)
    return embed.embed_partition(load_model_dir(model_dir), part, out_dir, params.embed, model_version)


def _task_runner(address: str) -> Any:
    """embed.dask_address -> a task runner: "" threads here, local:N a LocalCluster, else a scheduler."""
    if not address:
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if address.startswith("local:"):
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": int(address[6:]), "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return DaskTaskRunner(address=address)


@flow(name="vaepipe-embed", log_prints=True)
def _embedding_flow(model: str, input_dir: str, output_dir: str, params: Params) -> dict[str, Any]:
    resolved = resolve_task(model)  # once: every part is embedded by the same version
    parts = embed.list_partitions(Path(input_dir))
    with parts_dir(Path(output_dir), [Path(input_dir)]) as tmp:
        futures = embed_partition_task.map(unmapped(resolved.directory), parts, unmapped(tmp),
                                           unmapped(params), unmapped(resolved.version))
        rows = [f.result() for f in futures]  # an exception here leaves nothing at output_dir
    get_run_logger().info("embedded %d rows of %d files into %s", sum(rows), len(parts), output_dir)
    return {"rows": sum(rows), "parts": len(parts), "model_version": resolved.version, "output": output_dir}


def embedding_flow(model: str, input_dir: Path, output_dir: Path, params: Params) -> dict[str, Any]:
    """The files of INPUT_DIR mapped over embed.dask_address into the parts of OUTPUT_DIR."""
    runner = _task_runner(params.embed.dask_address)
    return _embedding_flow.with_options(task_runner=runner)(str(model), str(input_dir), str(output_dir), params)


@flow(name="vaepipe-train", log_prints=True)
def training_flow(params_path: str | None = None, overrides: list[str] | None = None, out: str | None = None,
                  dvc: bool = False) -> Any:
    """newest table -> drift vs @champion -> prepare -> validate -> train -> evaluate challenger and
    champion -> register -> promote (the gate) [-> dvc commit, dvc push].

    dvc: write the outputs of dvc.yaml's stages, where dvc.yaml says (versioning.read_stages), and
    record them in dvc.lock (run from the project root).
    """
    params = load_params(Path(params_path) if params_path else None, overrides or [])
    stores.check_store()  # the flow ends in the registry: find a dead server before training
    tracked = versioning.check_project(params.data.prepared_dir, params.data.source) if dvc else None
    if tracked is not None and (overrides or (params_path and Path(params_path) != Path("params.yaml"))):
        get_run_logger().warning("dvc.lock records params.yaml; this run's --params/--set are not in it")
    started = time.perf_counter()
    params = replace(params, data=replace(params.data, source=newest_table_task(params)))
    drift_task(params.data.source, params)
    splits = prepare_task(params)
    # the table as recorded, in its own row order (the dvc.yaml stage validates the same): the
    # i.i.d. checks see what a split, a subset of the rows, would hide
    validate_task(params.data.source, params, tracked.validation if tracked else None)
    model_dir = train_task(splits["train"], Path(out) if out else _new_run_dir(), params, splits["val"])
    if tracked is not None:
        model_dir = install_model_task(model_dir, tracked)
    metrics = evaluate_task(str(model_dir), splits["test"], params,
                            tracked.metrics if tracked else model_dir / "metrics.json")
    champion = champion_task(params)
    champion_metrics = None if champion is None else evaluate_task(
        f"models:/{params.register.model_name}/{champion}", splits["test"], params, None)
    if tracked is not None:
        dvc_commit_task(tracked.training)  # before register: its lineage reads dvc.lock
    registered = register_task(model_dir, params, metrics, splits["test"])
    promotion = promote_task(params, registered.version, splits["test"])
    decision = register.decision_line(promotion, params.register.min_improvement)
    compare_task(metrics, champion_metrics, splits["test"], (registered.version, champion), decision)
    if tracked is not None:
        write_atomic(tracked.registered, register.registration_json(registered.name, registered.version))
        dvc_commit_task((versioning.REGISTER,))
        dvc_push_task()
    get_run_logger().info(decision)
    result = {"model_dir": str(model_dir), "source": params.data.source, "metrics": metrics,
              "champion_metrics": champion_metrics, "version": registered.version, "promotion": promotion,
              "decision": decision, "seconds": time.perf_counter() - started}
    # the run's final state says what the gate decided (its name ends `prefect deployment run --watch`)
    return Completed(message=decision, name=_state_name(promotion), data=result)


def _new_run_dir(root: Path = Path("models/runs")) -> Path:
    return root / time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def _state_name(promotion: dict[str, Any]) -> str:
    """The final state's name, which `prefect deployment run --watch` ends with: 'Promoted v3', 'Champion kept v2'."""
    if promotion["promoted"]:
        return f"Promoted v{promotion['challenger_version']}"
    old = promotion.get("champion_version")
    return "Not promoted" if old is None else f"Champion kept v{old}"
