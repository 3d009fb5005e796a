"""Register, promote and load back through a real MLflow sqlite store (one per module: migrations cost seconds).

What several tests read is made once by a module fixture, whichever test asks first: `registered`
(version 1 of measurement-vae, @challenger only), `crowned` (then promoted: @champion),
`second` (version 1 of second-vae, never a champion). No test depends on another having run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from pipeline import stores
from pipeline.config import Params, load_params
from pipeline.contract.model import load_model_dir
from pipeline.errors import GateRefused, PipelineError, ValidationFailed
from pipeline.io.sources import synthetic_table
from pipeline.io.tables import write_table_atomic
from pipeline.registry import plots
from pipeline.registry.gate import Promotion, promote
from pipeline.registry.lineage import lineage_tags
from pipeline.registry.register import RegisteredVersion, register_model
from pipeline.registry.versions import download_model_dir
from pipeline.stages.train import train_model
from tests.pipeline.helpers import LogRecords, own_store
from tests.pipeline.servers import free_port, server, server_env

NAME = "measurement-vae"
SETTINGS = [
    "data.id_columns=[row_id]", "model.latent_dim=2", "model.hidden_dims=[16]", "train.num_threads=1",
    "train.batch_size=32", "train.lr=0.01", "evaluate.iw_samples=50", "embed.score_samples=20",
    # from a random start, so that a model trained for more epochs is the better one (the gate's
    # tests need a worse and a better challenger; the closed-form start makes every model good)
    "train.init=random",
]


class Store:
    """The module's store, tables and models."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        df = synthetic_table(300, 6, seed=1)
        self.train = write_table_atomic(df.iloc[:240], root / "train.parquet")
        self.test = write_table_atomic(df.iloc[240:].reset_index(drop=True), root / "test.parquet")
        self.test_frame = pd.read_parquet(self.test)
        self.models: dict[int, Path] = {}

    def params(self, *extra: str) -> Params:
        return load_params(None, [*SETTINGS, *extra])

    def model(self, epochs: int) -> Path:
        """A trained model directory (cached per epoch count)."""
        if epochs not in self.models:
            out = self.root / f"model-{epochs}"
            train_model(self.train, out, self.params(f"train.epochs={epochs}"))
            self.models[epochs] = out
        return self.models[epochs]

    def other_model(self) -> Path:
        """A model of another table ('x0', 'x1', 'x2', 'depth'), trained once."""
        out = self.root / "other-model"
        if not (out / "model.json").exists():
            other = write_table_atomic(synthetic_table(200, 4, seed=3).rename(columns={"x3": "depth"}),
                                       self.root / "other.parquet")
            train_model(other, out, self.params("train.epochs=3"))
        return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("registry").resolve()
    with own_store(root):
        yield Store(root)


@dataclass(frozen=True)
class Registered:
    version: RegisteredVersion
    records: list[logging.LogRecord]  # what MLflow logged while registering


@pytest.fixture(scope="module")
def registered(store: Store) -> Registered:
    """Version 1 of NAME: the 10-epoch model with its held-out metrics, @challenger."""
    metrics = {"log_likelihood": -12.5, "elbo": -13.0, "log_likelihood_stderr": None,
               "per_feature_reconstruction": {f"x{j}": -2.0 - j for j in range(6)}}
    mlflow_log, records = logging.getLogger("mlflow"), LogRecords()  # MLflow's loggers do not propagate to the root
    mlflow_log.addHandler(records)
    try:
        v = register_model(store.model(10), store.params(), metrics=metrics, table=store.test)
    finally:
        mlflow_log.removeHandler(records)
    return Registered(v, records.records)


@pytest.fixture(scope="module")
def crowned(registered: Registered, store: Store) -> Promotion:
    """Version 1 of NAME promoted: there was no champion."""
    return promote(store.params(), store.test)


@pytest.fixture(scope="module")
def second(store: Store) -> RegisteredVersion:
    """Version 1 of second-vae, @challenger; no test makes it a champion."""
    return register_model(store.model(10), store.params("register.model_name=second-vae"))


def champion(name: str = NAME) -> str | None:
    version = MlflowClient().get_registered_model(name).aliases.get("champion")
    return None if version is None else str(version)  # an int on SQL stores


# ---------------------------------------------------------------- register


def test_register_logs_the_run_and_creates_version_1_as_challenger(registered: Registered) -> None:
    v, records = registered.version, registered.records
    text = "\n".join(r.getMessage() for r in records)
    assert any(r.name.startswith("mlflow.pyfunc") for r in records), text  # it hears MLflow
    # logged from code: MLflow's "serialized using CloudPickle ... arbitrary code" warning is not given
    assert not [r for r in records if "CloudPickle" in r.getMessage()], text
    client = MlflowClient()
    assert (v.name, v.version, v.alias, v.model_uri) == (NAME, "1", "challenger", f"models:/{NAME}/1")
    assert "MLFLOW_REGISTRY_URI" not in os.environ  # a process-global registry would outlive this store
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "1"  # an int on SQL stores
    run = client.get_run(v.run_id).data
    assert run.params["train.epochs"] == "10" and run.params["model.hidden_dims"] == "[16]"
    assert [m.step for m in client.get_metric_history(v.run_id, "train_elbo")] == list(range(1, 11))
    assert len(client.get_metric_history(v.run_id, "val_elbo")) == 10
    assert run.metrics["test_log_likelihood"] == -12.5 and "test_log_likelihood_stderr" not in run.metrics
    assert run.tags["data_hash"].startswith("sha256:") and run.tags["seed"] == "0"
    assert run.tags["git_commit"] and run.tags["version.mlflow"] == mlflow.__version__
    assert json.loads(run.tags["config"])["train"]["epochs"] == 10
    tags = client.get_model_version(NAME, "1").tags
    assert tags["schema_hash"] == run.tags["schema_hash"] and len(tags["schema_hash"]) == 64
    artifacts = {a.path for a in client.list_artifacts(v.run_id)} | {a.path for a in client.list_artifacts(v.run_id, "plots")}
    assert {"metrics.json", "params.json", "plots/loss_curves.png", "plots/latent.png",
            "plots/traversals.png", "plots/per_feature_reconstruction.png"} <= artifacts


def test_registered_version_holds_the_model_directory_without_its_checkpoint(registered: Registered) -> None:
    path = download_model_dir(f"models:/{NAME}/1")
    assert {"model.json", "weights.pt", "history.csv"} <= {p.name for p in path.iterdir()}
    assert not (path / "checkpoint.pt").exists()
    assert download_model_dir(f"models:/{NAME}@challenger") == path  # cached, reused


def test_register_refuses_a_bad_model_dir_before_writing_anything(
        store: Store, registered: Registered, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="model.json"):
        register_model(tmp_path, store.params())
    assert [str(m.version) for m in MlflowClient().search_model_versions(f"name = '{NAME}'")] == ["1"]


def test_lineage_takes_the_data_hash_from_dvc_lock_when_it_names_the_training_table(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model = load_model_dir(store.model(10))
    monkeypatch.chdir(tmp_path)
    assert lineage_tags(model, {})["data_hash"].startswith("sha256:")  # no dvc.lock here
    deps = [{"path": "pipeline/train.py", "md5": "c0de"}, {"path": str(store.train), "md5": "da7a"}]
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"train": {"deps": deps}}}))
    tags = lineage_tags(model, {"train": {"seed": 7}})
    assert (tags["data_hash"], tags["data_hash_source"], tags["seed"]) == ("md5:da7a", "dvc.lock", "7")
    deps[1]["path"] = "data/other.parquet"  # a lock for another table: not this model's data
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"train": {"deps": deps}}}))
    assert lineage_tags(model, {})["data_hash"].startswith("sha256:")


@pytest.mark.parametrize(("ref", "says"), [
    ("models:/second-vae@champion", "no such alias; registered aliases: challenger"),
    ("models:/no-such-model@champion", "no registered model named 'no-such-model'"),
    (f"models:/{NAME}/9", "no such version; versions of measurement-vae: 1"),
    ("models:/", "expected models:/NAME@ALIAS or models:/NAME/VERSION"),
])
def test_download_errors_name_the_ref(registered: Registered, second: RegisteredVersion, ref: str, says: str) -> None:
    with pytest.raises(PipelineError) as info:
        download_model_dir(ref)
    assert str(info.value).startswith(ref) and says in str(info.value)


# ---------------------------------------------------------------- promote


def test_promote_without_a_champion_promotes_the_challenger(crowned: Promotion) -> None:
    result = crowned
    assert result.promoted and result.challenger_version == "1" and result.champion_version is None
    assert result.challenger_log_likelihood is not None and np.isfinite(result.challenger_log_likelihood)
    assert champion() == "1"
    tags = MlflowClient().get_model_version(NAME, "1").tags
    assert tags["validation_status"] == "passed" and "promoted_at" in tags


def test_promoting_the_champion_again_does_nothing(store: Store, crowned: Promotion) -> None:
    result = promote(store.params(), store.test)
    assert not result.promoted and "already @champion" in result.message and champion() == "1"


def _with_champion(store: Store, name: str) -> Params:
    """A registered model NAME of its own whose version 1 (10 epochs) is @champion: a gate test
    that builds on no other test's registrations, whatever runs before it."""
    params = store.params(f"register.model_name={name}")
    register_model(store.model(10), params)
    promote(params, store.test)
    assert champion(name) == "1"
    return params


def test_a_worse_challenger_is_refused_and_nothing_moves(store: Store) -> None:
    params = _with_champion(store, "gate-worse")
    v = register_model(store.model(1), params)
    with pytest.raises(GateRefused) as info:
        promote(params, store.test)
    assert champion("gate-worse") == "1" and v.version == "2"
    message = str(info.value)
    assert "version 2" in message and "version 1" in message
    tags = MlflowClient().get_model_version("gate-worse", "2").tags
    assert float(tags["gate_log_likelihood"]) < float(tags["gate_champion_log_likelihood"])
    assert tags["gate_result"] == "refused" and "promoted_at" not in tags


def test_a_better_challenger_passes_only_by_min_improvement(store: Store) -> None:
    params = _with_champion(store, "gate-better")
    v = register_model(store.model(60), params)
    with pytest.raises(GateRefused, match="min_improvement 1e\\+06"):
        promote(store.params("register.model_name=gate-better", "register.min_improvement=1000000"), store.test)
    assert champion("gate-better") == "1"
    result = promote(params, store.test, version=v.version)
    assert result.promoted and (result.challenger_version, result.champion_version) == ("2", "1")
    new, old = result.challenger_log_likelihood, result.champion_log_likelihood
    assert new is not None and old is not None and new > old and result.required == old
    assert champion("gate-better") == "2"


def test_a_first_champion_needs_a_table_that_passes_validation(store: Store, second: RegisteredVersion) -> None:
    params = store.params("register.model_name=second-vae")
    trending = write_table_atomic(store.test_frame.sort_values("x0"), store.root / "sorted.parquet")
    with pytest.raises(ValidationFailed, match="sorted.parquet fails validation against version 1 of second-vae"):
        promote(params, trending)
    assert champion("second-vae") is None


def test_promote_needs_a_challenger(store: Store, registered: Registered) -> None:
    with pytest.raises(PipelineError, match="no challenger: run vaepipe register first"):
        promote(store.params("register.model_name=nothing-here"), store.test)
    with pytest.raises(PipelineError, match="no such version"):
        promote(store.params(), store.test, version="42")


# ---------------------------------------------------------------- the pyfunc


PREDICT = textwrap.dedent("""
    import json, sys, time
    import mlflow, pandas as pd
    t = time.perf_counter()
    model = mlflow.pyfunc.load_model("models:/measurement-vae@champion")
    loaded = time.perf_counter() - t
    out = model.predict(pd.read_parquet(sys.argv[1]))
    print(json.dumps({"columns": list(out.columns), "rows": len(out), "ids": out["row_id"].tolist(),
                      "anomaly": str(out["anomaly"].dtype), "load_s": loaded, "total_s": time.perf_counter() - t}))
""")


def test_champion_loads_and_embeds_in_a_fresh_process(store: Store, crowned: Promotion) -> None:
    env = os.environ | {"MLFLOW_TRACKING_URI": store.uri}
    done = subprocess.run([sys.executable, "-c", PREDICT, str(store.test)], env=env, cwd=store.root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["columns"] == ["row_id", "z_0", "z_1", "log_likelihood", "anomaly"]
    assert out["rows"] == len(store.test_frame) and out["ids"] == store.test_frame["row_id"].tolist()
    assert out["anomaly"] == "bool"


def test_signature_lists_typed_inputs_and_outputs_and_no_pickle_is_logged(store: Store, crowned: Promotion) -> None:
    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    inputs = {c["name"]: c["type"] for c in info.signature.inputs.to_dict()}
    assert inputs == {"row_id": "long", **{f"x{j}": "double" for j in range(6)}}
    assert info.signature.inputs.input_names() == ["row_id", *(f"x{j}" for j in range(6))]
    assert info.signature.outputs.input_names() == ["row_id", "z_0", "z_1", "log_likelihood", "anomaly"]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion"))
    assert (local / "pyfunc_model.py").exists() and not list(local.glob("*.pkl"))
    assert "model_code_path" in (local / "MLmodel").read_text()


def test_predict_names_a_missing_column_and_ignores_an_extra_one(store: Store, crowned: Promotion) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"missing inputs \['x3'\]"):
        model.predict(store.test_frame.drop(columns=["x3"]))
    expected = model.predict(store.test_frame)
    pd.testing.assert_frame_equal(model.predict(store.test_frame.assign(extra=1.0)), expected)


def test_predict_warns_about_drifted_columns(store: Store, crowned: Promotion, caplog: pytest.LogCaptureFixture) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    frame = store.test_frame
    with caplog.at_level("WARNING", logger="pipeline.registry.pyfunc"):
        model.predict(frame)
        assert not [r for r in caplog.records if "drifted" in r.getMessage()]
        model.predict(frame.assign(x4=frame["x4"] + 3 * frame["x4"].std()))
    [warning] = [r.getMessage() for r in caplog.records if "drifted" in r.getMessage()]
    assert "'x4' (+" in warning and "'x1'" not in warning


@pytest.mark.parametrize(("change", "says"), [
    (lambda df: df.drop(columns=["x3"]), "missing column 'x3'"),
    (lambda df: df.assign(extra=1.0), "extra column 'extra'"),
])
def test_the_table_contract_names_missing_and_extra_columns(store: Store, crowned: Promotion, change, says: str) -> None:
    """A bad request is the client's fault: an MlflowException with a 400 code (the server's answer)."""
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").unwrap_python_model()
    with pytest.raises(mlflow.exceptions.MlflowException, match=says) as raised:
        model.predict(None, change(store.test_frame))
    assert raised.value.get_http_status_code() == 400


def test_predict_names_the_column_and_row_of_a_nan_cell(store: Store, crowned: Promotion) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    frame = store.test_frame.copy()
    frame.loc[3, "x2"] = np.nan
    with pytest.raises(mlflow.exceptions.MlflowException) as raised:
        model.predict(frame)
    assert raised.value.get_http_status_code() == 400
    assert "'x2'" in raised.value.message and "row 3" in raised.value.message, raised.value.message


@pytest.fixture(scope="module")
def served(store: Store, crowned: Promotion) -> Iterator[str]:
    """`mlflow models serve` of the champion on a free port (its own process, like a user's)."""
    port = free_port()
    args = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
            "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with server(args, f"http://127.0.0.1:{port}/ping", store.root / "serve.log",
                server_env(MLFLOW_TRACKING_URI=store.uri), store.root):
        yield f"http://127.0.0.1:{port}"


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def request_from_signature(rows: pd.DataFrame, drop: str | None = None) -> dict:
    """What a client written from MLflow's documentation sends: the signature's columns, in order."""
    names = mlflow.models.get_model_info(f"models:/{NAME}@champion").signature.inputs.input_names()
    names = [n for n in names if n != drop]
    return {"dataframe_split": {"columns": names, "data": rows[names].values.tolist()}}


@pytest.mark.slow
def test_served_champion_answers_a_request_built_from_its_signature(store: Store, served: str) -> None:
    url, rows = served, store.test_frame.head(7)
    status, body = post(url, request_from_signature(rows))
    assert status == 200, body
    out = pd.DataFrame(body["predictions"])
    assert list(out.columns) == ["row_id", "z_0", "z_1", "log_likelihood", "anomaly"]
    assert out["row_id"].tolist() == rows["row_id"].tolist()


@pytest.mark.slow
def test_served_champion_names_a_missing_column(store: Store, served: str) -> None:
    url, rows = served, store.test_frame.head(7)
    status, body = post(url, request_from_signature(rows, drop="x2"))
    assert status == 400 and "x2" in body["message"] and "missing" in body["message"]


# ---------------------------------------------------------------- stores and plots


def test_default_store_is_sqlite_under_the_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert stores.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow' / 'mlflow.db'}"
    assert stores.artifact_location() == (tmp_path.resolve() / "mlflow" / "artifacts").as_uri()
    assert not list((tmp_path / "mlflow").glob("**/*.py"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert stores.tracking_uri() == "http://127.0.0.1:5000" and stores.artifact_location() is None


def test_plots_cover_one_many_latent_dims_and_many_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    written = [
        *plots.latent_view(rng.normal(size=(50, 1)), tmp_path / "k1"),
        *plots.latent_view(rng.normal(size=(50, 5)), tmp_path / "k5"),
        *plots.traversals(rng.normal(size=(3, 7, 40)), [f"f{i}" for i in range(40)], tmp_path, scale=np.ones(40)),
        *plots.per_feature_reconstruction({f"f{i}": -float(i) for i in range(100)}, tmp_path),
    ]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)



def test_a_model_of_another_table_is_not_registered_under_the_champions_name(
        store: Store, crowned: Promotion) -> None:
    """Its columns are not the champion's: no comparison, no new version, a message naming the key."""
    other, out = store.root / "other.parquet", store.other_model()
    before = [v.version for v in MlflowClient().search_model_versions(f"name = '{NAME}'")]
    with pytest.raises(PipelineError, match=r"missing columns 'x3', 'x4', 'x5'.*register\.model_name=other-vae"):
        register_model(out, store.params(f"data.source={other}"))
    assert [v.version for v in MlflowClient().search_model_versions(f"name = '{NAME}'")] == before
    v = register_model(out, store.params(f"data.source={other}", "register.model_name=other-vae"))
    assert (v.name, v.version) == ("other-vae", "1")


def test_the_gate_names_the_key_when_two_versions_hold_different_tables(store: Store) -> None:
    """Versions of two tables under one name (registered while there was no champion, or before
    registration checked): promote says what to do instead of failing to evaluate the champion."""
    other = store.other_model()
    params = store.params("register.model_name=mixed")
    first = register_model(store.model(10), params)
    second = register_model(other, params)
    promote(params, store.test, version=first.version)
    with pytest.raises(PipelineError, match=r"version 2 of mixed has another table contract.*register\.model_name"):
        promote(params, store.test, version=second.version)
    assert champion("mixed") == first.version


def test_versions_registered_before_the_registry_package_still_find_their_class() -> None:
    """Their stored code (a copy of pyfunc_model.py) runs `from pipeline.pyfunc import VAEPyfunc`
    when MLflow loads them: that path stays, as the registry's own class."""
    from pipeline.pyfunc import VAEPyfunc
    from pipeline.registry import pyfunc

    assert VAEPyfunc is pyfunc.VAEPyfunc
    assert "from pipeline.registry.pyfunc import VAEPyfunc" in pyfunc.MODEL_CODE.read_text()
