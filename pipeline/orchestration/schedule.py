"""`vaepipe serve`: the deployment vaepipe-train/retrain on a real Prefect server."""

from __future__ import annotations


def serve(cron: str, params_path: str | None, overrides: list[str], dvc: bool) -> None:
    """Serve the deployment vaepipe-train/retrain on CRON; one run at a time (they share the repo)."""
    from prefect.deployments.runner import EntrypointType

    from pipeline.orchestration.flows import training_flow

    training_flow.serve(name="retrain", cron=cron, limit=1, entrypoint_type=EntrypointType.MODULE_PATH,
                        parameters={"params_path": params_path, "overrides": overrides, "dvc": dvc})
