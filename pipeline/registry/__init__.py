"""The MLflow model registry: register, resolve, the gate, the pyfunc form of a model, lineage, plots."""
