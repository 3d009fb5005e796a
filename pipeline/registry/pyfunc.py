"""The registered form of a model: an MLflow pyfunc whose predict is the embed step.

`mlflow.pyfunc.load_model("models:/measurement-vae@champion").predict(df)` returns the embedding
frame of `vaepipe embed` (docs/architecture.md, "Contracts"): ids, z_*, log_likelihood, anomaly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from pipeline.config import EmbedParams, ValidateParams
from pipeline.contract.drift import column_drift, drift_summary
from pipeline.contract.model import LoadedModel, load_model_dir
from pipeline.errors import PipelineError
from pipeline.registry.versions import ARTIFACT_KEY
from pipeline.stages.embed import embed_frame

log = logging.getLogger(__name__)
MIN_DRIFT_ROWS = 30  # smaller requests say too little about the distribution to warn on
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # logged as the model's code, not a pickle


def embed_params(model: LoadedModel) -> EmbedParams:
    """The embed section the model was trained with (its anomaly threshold matches it)."""
    return EmbedParams(**model.metadata.get("params", {}).get("embed", {}))


def validate_params(model: LoadedModel) -> ValidateParams:
    """The validate section the model was trained with (its drift limits)."""
    return ValidateParams(**model.metadata.get("params", {}).get("validate", {}))


def pip_requirements() -> list[str]:
    """Explicit, so MLflow does not infer them in a subprocess (seconds per log)."""
    return [f"torch=={torch.__version__.split('+')[0]}", "pandas", "pyarrow", f"mlflow=={mlflow.__version__}"]


class VAEPyfunc(PythonModel):
    """Loads the model directory logged as artifact `model_dir`; predict embeds a DataFrame.

    The table contract is checked by the embed step: missing or extra columns raise a
    PipelineError that names them. A request of MIN_DRIFT_ROWS rows or more whose columns drifted
    from the training distribution (validate.drift limits) logs a warning naming them.
    """

    def load_context(self, context: Any) -> None:
        self.model = load_model_dir(Path(context.artifacts[ARTIFACT_KEY]))
        self.params = embed_params(self.model)
        self.drift = validate_params(self.model)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        try:
            out = embed_frame(self.model, model_input, self.params, where="predict input")
        except PipelineError as exc:  # the input's fault: MLflow's server answers 400 with this line
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        if len(model_input) >= MIN_DRIFT_ROWS and self.drift.drift != "off":
            drifted = drift_summary(column_drift(self.model.schema, model_input, self.drift))
            if drifted:
                log.warning("predict input of %d rows drifted from the training distribution: %s",
                            len(model_input), drifted)
        return out
