"""The code MLflow logs with every registered version ("models from code"): no pickled object.

MLflow runs this file when it loads the version (`mlflow.pyfunc.load_model`, `mlflow models
serve`); it needs vaepipe importable in that environment. It is never imported by vaepipe itself.
"""

from mlflow.models import set_model

from pipeline.registry.pyfunc import VAEPyfunc

set_model(VAEPyfunc())
