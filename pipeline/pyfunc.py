"""The registered model's class at its path before pipeline/registry/ existed: kept for them.

Each version registered before then stores, as its code, a copy of pyfunc_model.py that runs
`from pipeline.pyfunc import VAEPyfunc` when MLflow loads it (`mlflow.pyfunc.load_model`,
`mlflow models serve`); without this module those versions no longer load. New versions import
pipeline.registry.pyfunc.
"""

from pipeline.registry.pyfunc import VAEPyfunc

__all__ = ["VAEPyfunc"]
