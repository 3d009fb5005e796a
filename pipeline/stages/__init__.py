"""The stages, one module each: what the CLI, the Prefect flows and the dvc.yaml stages (through the
CLI) all call. Each module's `run` is its command; the functions beside it do the work."""
