"""The training flow as a real Prefect flow run (ephemeral API, one harness per session)."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from pipeline.errors import ValidationFailed
from pipeline.orchestration.flows import training_flow
from tests.pipeline.helpers import FAST, new_store


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", new_store(tmp_path))
    return tmp_path


def test_training_flow_registers_a_champion(prefect_harness, store):
    overrides = [*FAST, "data.source=synthetic:300x6", "data.id_columns=[row_id]"]
    state = training_flow(overrides=overrides, out=str(store / "models" / "a"), return_state=True)
    assert state.is_completed()
    result = state.result()
    assert (store / "models" / "a" / "model.json").exists()
    assert set(result["metrics"]) >= {"elbo", "log_likelihood", "log_likelihood_stderr", "kl_per_dim"}
    assert result["version"] == "1" and result["promotion"]["promoted"] is True
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("measurement-vae", "champion").version) == "1"

    from prefect.artifacts import Artifact

    metrics = Artifact.get("metrics")
    assert metrics is not None and "log_likelihood" in str(metrics.data)


def test_flow_stops_on_invalid_data_and_registers_nothing(prefect_harness, store):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(300, 4)), columns=list("abcd")).sort_values("a")
    df.to_csv(store / "trend.csv", index=False)
    says = r"trend\.csv failed validation: autocorrelation column 'a': .*also trend \(a\)"  # file, check, column
    with pytest.raises(ValidationFailed, match=says):
        training_flow(overrides=[*FAST, f"data.source={store / 'trend.csv'}", "data.test_fraction=0.2"],
                      out=str(store / "models" / "b"))
    assert not (store / "models" / "b").exists()
    assert MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}").search_registered_models() == []
