"""Running the stages together: the Prefect flows, the scheduled deployment, DVC versioning of a
flow run, progress lines."""
