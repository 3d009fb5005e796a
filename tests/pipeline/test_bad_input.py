"""Bad input never loses data and never looks like a bug (issue 10).

Each case runs the CLI on one user or environment mistake and checks: the exit code (2 usage or
input, 1 invalid data), one line on stderr that names the culprit (file, key or column), no
traceback, and that nothing in the working folder or the model directory was written or changed.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cli import main
from pipeline.contract.schema import Schema
from pipeline.stores import HTTP_DEFAULTS
from tests.pipeline.helpers import clean_table
from tests.pipeline.servers import free_port

FAST = ["train.epochs=2", "train.batch_size=64", "model.hidden_dims=[8]", "model.latent_dim=2",
        "evaluate.iw_samples=5", "embed.score_samples=5", "data.id_columns=[sample_id]"]
ARGS = [a for s in FAST for a in ("--set", s)]
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Work:
    """What a case may use: a trained model (read-only), a clean table, a scratch folder."""

    model: Path
    table: Path
    tmp: Path
    mounts: dict[str, Path | None]
    servers: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.tmp / name

    def model_copy(self, edit: Callable[[Path], None]) -> Path:
        target = self.tmp / "edited-model"
        shutil.copytree(self.model, target)
        edit(target)
        return target

    def mount(self, kind: str) -> Path:
        path = self.mounts.get(kind)
        if path is None:
            pytest.skip(f"needs a {kind} tmpfs (root and mount); the RLIMIT_FSIZE case covers a full disk unprivileged")
        return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    table = root / "train.parquet"
    clean_table(n=200, seed=1).to_parquet(table, index=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the cases run beside no params.yaml either: --resume compares the params
        assert main(["train", str(table), "--out", str(root / "model"), *ARGS]) == 0
    return root / "model", table


def _mount(path: Path, options: str) -> Path | None:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return None
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return path if done.returncode == 0 else None


@pytest.fixture(scope="module")
def mounts(tmp_path_factory):
    """Real file systems: a read-only one and a full one (16 KiB), where this machine lets us mount."""
    root = tmp_path_factory.mktemp("mounts")
    found = {"read-only": _mount(root / "ro", "ro,size=64k"), "full": _mount(root / "full", "size=16k")}
    yield found
    for path in found.values():
        if path is not None:
            subprocess.run(["umount", str(path)], check=False)


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.send_error(404)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


def _accept(sock: socket.socket, hold: list[socket.socket] | None) -> None:
    """Accept connections, then drop each at once (hold None) or keep it open and never answer."""
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        if hold is None:
            conn.close()
        else:
            hold.append(conn)


@pytest.fixture(scope="module")
def servers():
    """Stores that are not MLflow: a web server answering 404, one that drops every connection, one that never answers."""
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    held: list[socket.socket] = []
    dropper, hanger = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_accept, args=(dropper, None), daemon=True).start()
    threading.Thread(target=_accept, args=(hanger, held), daemon=True).start()
    yield {"not-mlflow": f"http://127.0.0.1:{web.server_address[1]}",
           "drops": f"http://127.0.0.1:{dropper.getsockname()[1]}",
           "hangs": f"http://127.0.0.1:{hanger.getsockname()[1]}"}
    web.shutdown()
    for sock in (dropper, hanger, *held):
        sock.close()


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under roots with its mode and a digest of its bytes: any write shows."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            mode = oct(p.stat().st_mode & 0o7777)
            out[str(p)] = f"dir {mode}" if p.is_dir() else f"{mode} {hashlib.sha256(p.read_bytes()).hexdigest()}"
    return out


def _dead_store(w: Work, variable: str = "MLFLOW_TRACKING_URI") -> str:
    w.env[variable] = f"http://127.0.0.1:{free_port()}" + ("/api" if variable == "PREFECT_API_URL" else "")
    return "unreachable"


def _store(w: Work, kind: str, culprit: str) -> str:
    w.env["MLFLOW_TRACKING_URI"] = w.servers[kind]
    return culprit


def _csv(w: Work, name: str, header: str, rows: int = 60) -> Path:
    rng = np.random.default_rng(0)
    body = "".join(",".join([str(i), *(f"{v:.4f}" for v in rng.random(header.count(",")))]) + "\n"
                   for i in range(rows))
    path = w.path(name)
    path.write_text(header + "\n" + body)
    return path


def _table(w: Work, name: str, edit: Callable[[pd.DataFrame], pd.DataFrame] = lambda d: d) -> Path:
    path = w.path(name)
    df = edit(clean_table(n=120, seed=2))
    (df.to_csv(path, index=False) if path.suffix == ".csv" else df.to_parquet(path, index=False))
    return path


def _edit_manifest(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        manifest = json.loads((model / "model.json").read_text())
        (model / "model.json").write_text(json.dumps(edit(manifest)))
    return apply


def _set(d: dict, section: str, key: str, value: object) -> dict:
    d[section][key] = value
    return d


def _id_like_output(manifest: dict) -> dict:
    """A model (from before this check) whose id column is named like embed's z_0, with a valid hash."""
    schema = dict(manifest["metadata"]["schema"], id_columns=["z_0"], hash="")
    manifest["metadata"]["schema"] = Schema.from_dict({**schema, "hash": Schema(**schema).hash}).to_dict()
    return manifest


def _interrupted_run(w: Work, checkpoint: Callable[[Path], None]) -> Path:
    """An interrupted training run in OUT (run.json + checkpoint.pt) whose checkpoint is then damaged."""
    out = w.path("interrupted")
    out.mkdir()
    for name in ("run.json", "checkpoint.pt"):
        shutil.copy(w.model / name, out / name)
    checkpoint(out / "checkpoint.pt")
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _older_version(path: Path) -> None:
    """The run record of a vaepipe that had no train.val_max_rows (the checkpoint stays whole)."""
    record = json.loads((path.parent / "run.json").read_text())
    del record["params"]["train"]["val_max_rows"]
    (path.parent / "run.json").write_text(json.dumps(record))


def _foreign(path: Path) -> None:
    torch.save({"state": torch.zeros(3)}, path)


# id -> (argv from a Work, expected exit code, the text the one line must contain)
Case = Callable[[Work], tuple[list[str], int, str]]
CASES: dict[str, Case] = {
    # ---- the cases: data loss or silently wrong output
    "embed-input-is-output": lambda w: (["embed", str(w.model), str(_table(w, "in.parquet")), str(w.path("in.parquet")), *ARGS], 2, "is the input"),
    "embed-input-is-output-other-spelling": lambda w: (["embed", str(w.model), str(_table(w, "in.parquet")), str(w.tmp / "." / "in.parquet"), *ARGS], 2, "in.parquet"),
    "embed-output-symlink-to-input": lambda w: (["embed", str(w.model), str(_table(w, "in.parquet")), str(_symlink(w.path("link.parquet"), w.path("in.parquet"))), *ARGS], 2, "is the input"),
    "id-column-named-z_0-at-train": lambda w: (["train", str(w.table), "--out", str(w.path("m")), *ARGS, "--set", "data.id_columns=[z_0]"], 2, "z_0"),
    "id-column-named-z_0-at-embed": lambda w: (["embed", str(w.model_copy(_edit_manifest(_id_like_output))), str(_table(w, "z.parquet", lambda d: d.rename(columns={"sample_id": "z_0"}))), str(w.path("e.parquet")), *ARGS], 2, "would be overwritten"),
    "embed-output-csv": lambda w: (["embed", str(w.model), str(w.table), str(w.path("e.csv")), *ARGS], 2, "e.csv"),
    "duplicate-csv-header": lambda w: (["train", str(_csv(w, "dup.csv", "sample_id,alcohol,alcohol,b")), "--out", str(w.path("m")), *ARGS], 2, "'alcohol'"),
    # ---- the cases: user or environment mistakes that were internal errors
    "duplicate-parquet-columns": lambda w: (["validate", str(_dup_parquet(w)), *ARGS], 2, "'m0'"),
    "hidden_dims-foo": lambda w: (["train", str(w.table), "--out", str(w.path("m")), *ARGS, "--set", "model.hidden_dims=foo"], 2, "model.hidden_dims"),
    "latent_dim-2.5": lambda w: (["train", str(w.table), "--out", str(w.path("m")), *ARGS, "--set", "model.latent_dim=2.5"], 2, "model.latent_dim"),
    "lr-nan": lambda w: (["train", str(w.table), "--out", str(w.path("m")), *ARGS, "--set", "train.lr=.nan"], 2, "train.lr"),
    "out-is-a-file": lambda w: (["train", str(w.table), "--out", str(_file(w.path("afile"))), *ARGS], 2, "afile"),
    "manifest-without-model": lambda w: (["embed", str(w.model_copy(_edit_manifest(lambda m: {k: v for k, v in m.items() if k != "model"}))), str(w.table), str(w.path("e.parquet"))], 2, "'model'"),
    "manifest-is-a-list": lambda w: (["evaluate", str(w.model_copy(_edit_manifest(lambda m: []))), str(w.table)], 2, "model.json"),
    "manifest-latent_dim-edited": lambda w: (["embed", str(w.model_copy(_edit_manifest(lambda m: _set(m, "model", "latent_dim", 3)))), str(w.table), str(w.path("e.parquet"))], 2, "model.json implies"),
    "output-on-read-only-fs": lambda w: (["embed", str(w.model), str(w.table), str(w.mount("read-only") / "e.parquet"), *ARGS], 2, "Read-only file system"),
    "output-on-full-disk": lambda w: (["embed", str(w.model), str(_big(w)), str(w.mount("full") / "e.parquet"), *ARGS], 2, "No space left"),
    "store-unreachable-register": lambda w: (["register", str(w.model)], 2, _dead_store(w)),
    "store-unreachable-run": lambda w: (["run", *ARGS], 2, _dead_store(w)),
    # ---- the cases: messages that did not say what is wrong in one line
    "malformed-yaml": lambda w: (["train", str(w.table), "--out", str(w.path("m")), "--params", str(_text(w.path("p.yaml"), "train:\n  epochs: 2\n lr: [1,\n"))], 2, "line 3, column 2"),
    "epochs-ten": lambda w: (["train", str(w.table), "--out", str(w.path("m")), "--params", str(_text(w.path("p.yaml"), 'train:\n  epochs: "ten"\n'))], 2, "train.epochs is 'ten'"),
    "id_columns-a-string": lambda w: (["train", str(w.table), "--out", str(w.path("m")), *ARGS, "--set", "data.id_columns=sample_id"], 2, "data.id_columns"),
    "1e39-embed-overflows-float32": lambda w: (["embed", str(w.model), str(_table(w, "big.parquet", _huge)), str(w.path("e.parquet")), *ARGS], 2, "float32"),
    "1e39-train-fails-validation": lambda w: (["train", str(_table(w, "big.parquet", _huge)), "--out", str(w.path("m")), *ARGS], 1, "float32"),
    "truncated-weights": lambda w: (["embed", str(w.model_copy(lambda m: _truncate(m / "weights.pt"))), str(w.table), str(w.path("e.parquet"))], 2, "weights.pt"),
    "foreign-weights": lambda w: (["embed", str(w.model_copy(lambda m: _foreign(m / "weights.pt"))), str(w.table), str(w.path("e.parquet"))], 2, "weights.pt"),
    "truncated-checkpoint-resume": lambda w: (["train", str(w.table), "--out", str(_interrupted_run(w, _truncate)), "--resume", *ARGS], 2, "checkpoint.pt"),
    "foreign-checkpoint-resume": lambda w: (["train", str(w.table), "--out", str(_interrupted_run(w, _foreign)), "--resume", *ARGS], 2, "checkpoint.pt"),
    # ---- more kinds
    "embed-output-is-a-directory": lambda w: (["embed", str(w.model), str(w.table), str(w.tmp), *ARGS], 2, "is a directory"),
    "output-folder-is-a-file": lambda w: (["sample", str(w.model), "5", str(_file(w.path("f")) / "s.parquet")], 2, "is a file"),
    "sample-output-txt": lambda w: (["sample", str(w.model), "5", str(w.path("s.txt"))], 2, "s.txt"),
    "validate-report-over-its-input": lambda w: (["validate", str(_table(w, "in.parquet")), "--report", str(w.path("in.parquet")), *ARGS], 2, "is the input"),
    "evaluate-json-over-its-input": lambda w: (["evaluate", str(w.model), str(_table(w, "in.parquet")), "--json", str(w.path("in.parquet"))], 2, "is the input"),
    "evaluate-json-on-read-only-fs": lambda w: (["evaluate", str(w.model), str(w.table), "--json", str(w.mount("read-only") / "m.json"), *ARGS], 2, "m.json"),
    "train-out-on-read-only-fs": lambda w: (["train", str(w.table), "--out", str(w.mount("read-only") / "m"), *ARGS], 2, "Read-only file system"),
    "params-file-missing": lambda w: (["validate", str(w.table), "--params", str(w.path("nope.yaml"))], 2, "nope.yaml"),
    "params-file-a-list": lambda w: (["validate", str(w.table), "--params", str(_text(w.path("p.yaml"), "- 1\n- 2\n"))], 2, "p.yaml"),
    "params-section-not-a-mapping": lambda w: (["validate", str(w.table), "--params", str(_text(w.path("p.yaml"), "train: 5\n"))], 2, "'train'"),
    "unknown-key": lambda w: (["validate", str(w.table), "--set", "train.epoch=3"], 2, "train.epoch"),
    "set-without-equals": lambda w: (["validate", str(w.table), "--set", "train.epochs"], 2, "train.epochs"),
    "choice-given-a-number": lambda w: (["validate", str(w.table), "--set", "train.device=3"], 2, "train.device"),
    "list-of-wrong-items": lambda w: (["validate", str(w.table), "--set", "model.hidden_dims=[a]"], 2, "model.hidden_dims[0]"),
    "bool-for-int": lambda w: (["validate", str(w.table), "--set", "model.latent_dim=true"], 2, "model.latent_dim"),
    "empty-value": lambda w: (["validate", str(w.table), "--set", "train.epochs="], 2, "train.epochs"),
    "id-column-twice": lambda w: (["validate", str(w.table), "--set", "data.id_columns=[sample_id, sample_id]"], 2, "data.id_columns"),
    "number-for-string": lambda w: (["validate", str(w.table), "--set", "register.model_name=12"], 2, "register.model_name"),
    "manifest-latent_dim-a-string": lambda w: (["embed", str(w.model_copy(_edit_manifest(lambda m: _set(m, "model", "latent_dim", "two")))), str(w.table), str(w.path("e.parquet"))], 2, "model.latent_dim"),
    "manifest-broken-json": lambda w: (["embed", str(w.model_copy(lambda m: _text(m / "model.json", "{broken"))), str(w.table), str(w.path("e.parquet"))], 2, "model.json"),
    "manifest-table-section-broken": lambda w: (["embed", str(w.model_copy(_edit_manifest(lambda m: {**m, "table": {"names": 1}}))), str(w.table), str(w.path("e.parquet"))], 2, "'table'"),
    "weights-missing": lambda w: (["embed", str(w.model_copy(lambda m: (m / "weights.pt").unlink())), str(w.table), str(w.path("e.parquet"))], 2, "weights.pt"),
    "model-dir-missing": lambda w: (["embed", str(w.path("no-model")), str(w.table), str(w.path("e.parquet"))], 2, "no-model"),
    "parquet-that-is-text": lambda w: (["validate", str(_text(w.path("t.parquet"), "a,b\n1,2\n"))], 2, "t.parquet"),
    "csv-overflows-float32": lambda w: (["embed", str(w.model), str(_table(w, "big.csv", _huge)), str(w.path("e.parquet")), *ARGS], 2, "'m1' row 5 holds 1e+39, beyond float32"),
    "batch_rows-zero": lambda w: (["embed", str(w.model), str(w.table), str(w.path("e.parquet")), "--set", "embed.batch_rows=0"], 2, "embed.batch_rows"),
    "csv-not-utf8": lambda w: (["validate", str(_bytes(w.path("latin1.csv"), "sample_id,caf\xe9\n1,2.5\n".encode("latin-1")))], 2, "latin1.csv is not a readable CSV table: not UTF-8 text"),
    "csv-ragged-rows": lambda w: (["validate", str(_text(w.path("ragged.csv"), "a,b\n1,2\n3,4,5\n"))], 2, "ragged.csv"),
    "iw_samples-zero": lambda w: (["evaluate", str(w.model), str(w.table), "--set", "evaluate.iw_samples=0"], 2, "evaluate.iw_samples is 0"),
    "output-name-too-long": lambda w: (["embed", str(w.model), str(w.table), str(w.path("e" * 300 + ".parquet")), *ARGS], 2, "File name too long"),
    "unknown-registered-model": lambda w: (["embed", "models:/no-such-model@champion", str(w.table), str(w.path("e.parquet"))], 2, "'no-such-model'"),
    "store-unreachable-promote": lambda w: (["promote", "--data", str(w.table)], 2, _dead_store(w)),
    "store-not-mlflow": lambda w: (["register", str(w.model)], 2, _store(w, "not-mlflow", "answered HTTP 404")),
    "store-drops-connections": lambda w: (["register", str(w.model)], 2, _store(w, "drops", "closed the connection without answering")),
    "store-never-answers": lambda w: (["register", str(w.model)], 2, _store(w, "hangs", "no answer within 3 s")),
    "registry-store-unreachable": lambda w: (["register", str(w.model)], 2, _dead_store(w, "MLFLOW_REGISTRY_URI")),
    "prefect-api-unreachable-run": lambda w: (["run", *ARGS], 2, _dead_store(w, "PREFECT_API_URL")),
    "prefect-api-unreachable-serve": lambda w: (["serve"], 2, _dead_store(w, "PREFECT_API_URL")),
    "store-unreachable-models-uri": lambda w: (["embed", "models:/measurement-vae@champion", str(w.table), str(w.path("e.parquet"))], 2, _dead_store(w)),
    # ---- issue 22: a folder OUTPUT never replaces what vaepipe did not write
    "embed-folder-output-contains-the-input": lambda w: (["embed", str(w.model), str(_days(w.path("top") / "days")), str(w.path("top")), *ARGS], 2, "contains the input"),
    "embed-folder-output-is-a-project-folder": lambda w: (["embed", str(w.model), str(_days(w.path("days"))), str(_project(w.path("data"))), *ARGS], 2, "did not write (it holds 'prepared')"),
    "embed-folder-output-is-the-model": lambda w: (["embed", str(w.model), str(_days(w.path("days"))), str(w.model), *ARGS], 2, "is a model directory"),
    "embed-folder-output-inside-the-model": lambda w: (["embed", str(w.model), str(_days(w.path("days"))), str(w.model / "emb"), *ARGS], 2, "inside the model directory"),
    "embed-folder-output-holds-a-user-file": lambda w: (["embed", str(w.model), str(_days(w.path("days"))), str(_keep(w.path("out"))), *ARGS], 2, "holds 'keep.txt'"),
    "embed-folder-output-is-the-working-folder-absolute": lambda w: (["embed", str(w.model), str(_days(w.path("days"))), str(w.tmp.parent.resolve()), *ARGS], 2, "working folder"),
    "embed-folder-output-is-the-input": lambda w: (["embed", str(w.model), str(_days(w.path("days"))), str(w.path("days")), *ARGS], 2, "is the input"),
    "embed-folder-output-is-dot": lambda w: (["embed", str(w.model), str(_days(w.path("days"))), ".", *ARGS], 2, "OUTPUT . is the working folder"),
    "embed-folder-output-is-dotdot": lambda w: (["embed", str(w.model), str(_days(w.path("days"))), "..", *ARGS], 2, "OUTPUT .. is the working folder"),
    "embed-folder-output-is-a-file": lambda w: (["embed", str(w.model), str(_days(w.path("days"))), str(_file(w.path("f.parquet"))), *ARGS], 2, "f.parquet is a file"),
    "embed-folder-over-dask-contains-the-input": lambda w: (["embed", str(w.model), str(_days(w.path("top") / "days")), str(w.path("top")), *ARGS, "--set", "embed.dask_address=tcp://127.0.0.1:9"], 2, "contains the input"),
    # ---- issue 22 and 21: no output lands on a model's files
    "evaluate-json-into-the-model": lambda w: (["evaluate", str(w.model), str(w.table), "--json", str(w.model / "model.json")], 2, "inside the model directory"),
    "validate-report-into-the-model": lambda w: (["validate", str(w.table), "--against", str(w.model), "--report", str(w.model / "model.json"), *ARGS], 2, "inside the model directory"),
    "sample-into-the-model": lambda w: (["sample", str(w.model), "10", str(w.model / "weights.parquet")], 2, "inside the model directory"),
    "register-output-into-the-model": lambda w: (["register", str(w.model), "--output", str(w.model / "registered.json")], 2, "inside the model directory"),
    # ---- issue 22: non-finite cells at evaluate, sizes that cannot be held
    "evaluate-nan-cell": lambda w: (["evaluate", str(w.model), str(_table(w, "nan.parquet", _cell(float("nan")))), "--json", str(w.path("m.json"))], 2, "column 'm1' row 7 holds nan"),
    "evaluate-inf-cell": lambda w: (["evaluate", str(w.model), str(_table(w, "inf.parquet", _cell(float("-inf"))))], 2, "column 'm1' row 7 holds -inf"),
    "sample-beyond-the-disk": lambda w: (["sample", str(w.model), str(10**15), str(w.path("s.parquet"))], 2, "free on that disk"),
    "synthetic-beyond-memory": lambda w: (["prepare", "--set", "data.source=synthetic:100000000000x2", "--set", f"data.prepared_dir={w.path('prepared')}"], 2, "synthetic:100000000000x2"),
    # ---- issue 23: the registry's inputs, the params file, very wide tables
    "register-alias-bad-characters": lambda w: (["register", str(w.model), "--alias", "bad alias/../x"], 2, "--alias 'bad alias/../x'"),
    "register-alias-reserved": lambda w: (["register", str(w.model), "--alias", "v3"], 2, "--alias 'v3'"),
    "register-alias-champion-skips-the-gate": lambda w: (["register", str(w.model), "--alias", "champion"], 2, "only the promotion gate moves @champion"),
    "register-metrics-not-json": lambda w: (["register", str(w.model), "--metrics", str(_text(w.path("garbage.json"), "garbage"))], 2, "garbage.json is not JSON (line 1, column 1)"),
    "register-metrics-a-list": lambda w: (["register", str(w.model), "--metrics", str(_text(w.path("list.json"), "[1, 2]"))], 2, "list.json is not a metrics JSON object"),
    "register-metrics-missing": lambda w: (["register", str(w.model), "--metrics", str(w.path("none.json"))], 2, "none.json does not exist"),
    "evaluate-json-over-the-default-params-file": lambda w: (["evaluate", str(w.model), str(w.table), "--json", str(_text(w.tmp.parent / "params.yaml", "train:\n  epochs: 3\n"))], 2, "is the params file"),
    "evaluate-json-over-the-given-params-file": lambda w: (["evaluate", str(w.model), str(w.table), "--params", str(_text(w.path("p.yaml"), "{}\n")), "--json", str(w.path("p.yaml"))], 2, "--json"),
    "sample-over-the-params-file": lambda w: (["sample", str(w.model), "5", str(w.path("p.csv")), "--params", str(_text(w.path("p.csv"), "{}\n"))], 2, "is the params file"),
    "train-csv-200000-columns-10-rows": lambda w: (["train", str(_wide_csv(w.path("wide.csv"), 200_000, 10)), "--out", str(w.path("m")), *ARGS], 2, "199,999 feature columns and 10 rows"),
    "train-parquet-5000-columns-50-rows": lambda w: (["train", str(_wide_parquet(w.path("wide.parquet"), 5_000, 50)), "--out", str(w.path("m")), *ARGS], 2, "4,999 feature columns and 50 rows"),
    # ---- issue 24: a source is never an output
    "csv-one-field-more-on-every-row": lambda w: (["train", str(_text(w.path("shifted.csv"), "sample_id,a,b\n" + "".join(f"{i},{i % 7}.5,{i % 5}.25,{i % 3}.75\n" for i in range(60)))), "--out", str(w.path("m")), *ARGS], 2, "row 1 has 4 fields but the header names 3 columns"),
    "train-val-table-with-a-nan-names-the-val-table": lambda w: (["train", str(w.table), "--out", str(w.path("m")), "--val", str(_table(w, "v.parquet", _cell(float("nan")))), *ARGS], 2, "v.parquet: column 'm1' row 7 holds nan"),
    "train-int64-near-2-62-fails-validation-by-precision": lambda w: (["train", str(_table(w, "big.parquet", _int64_near_2_62)), "--out", str(w.path("m")), *ARGS], 1, "float32_precision column 'big': holds integers near 4.61e+18"),
    "train-int64-near-2-62-prevalidated": lambda w: (["train", str(_table(w, "big.parquet", _int64_near_2_62)), "--out", str(w.path("m")), "--prevalidated", *ARGS], 2, "column 'big' holds integers near 4.61e+18 that differ by at most 119"),
    "resume-with-other-params-names-the-key": lambda w: (["train", str(w.table), "--out", str(_interrupted_run(w, lambda p: None)), "--resume", *ARGS, "--set", "train.epochs=3"], 2, "train.epochs is 3, the interrupted run had 2"),
    "resume-of-an-older-versions-run": lambda w: (["train", str(w.table), "--out", str(_interrupted_run(w, _older_version)), "--resume", *ARGS], 2, "started by an older vaepipe, which had no train.val_max_rows (now 1000)"),
    "resume-with-another-table": lambda w: (["train", str(_table(w, "other.parquet")), "--out", str(_interrupted_run(w, lambda p: None)), "--resume", *ARGS], 2, "the training table differs"),
    # ---- issue 21: broken stores and odd tables
    "damaged-store-truncated-register": lambda w: (["register", str(w.model)], 2, _damaged_store(w, lambda db: db.write_bytes(_SQLITE[:100]))),
    "damaged-store-overwritten-promote": lambda w: (["promote", "--data", str(w.table)], 2, _damaged_store(w, lambda db: db.write_bytes(b"not a database" * 20))),
    "damaged-store-truncated-embed-models-uri": lambda w: (["embed", "models:/measurement-vae@champion", str(w.table), str(w.path("e.parquet"))], 2, _damaged_store(w, lambda db: db.write_bytes(_SQLITE[:100]))),
    "tracking-uri-unknown-scheme": lambda w: (["register", str(w.model)], 2, _env(w, "MLFLOW_TRACKING_URI", "notascheme://x", "MLFLOW_TRACKING_URI=notascheme://x")),
    "parquet-column-with-an-empty-name": lambda w: (["train", str(_table(w, "e.parquet", lambda d: d.rename(columns={"m2": ""}))), "--out", str(w.path("m")), *ARGS], 2, "column 4 of 6 has an empty name"),
    "csv-saved-with-its-index": lambda w: (["validate", str(_text(w.path("i.csv"), ",a,b\n" + "".join(f"{i},{i % 7}.5,{i % 3}.25\n" for i in range(60))))], 2, "column 1 of 3 has an empty name (a table saved with its index"),
    "csv-delimiter-ambiguous": lambda w: (["validate", str(_text(w.path("amb.csv"), "a;b|c\n1;2|3\n4;5|6\n"))], 2, "amb.csv looks delimited by ';' or '|', not by commas"),
    "train-10-rows-5-columns": lambda w: (["train", str(_table(w, "tiny.parquet", lambda d: d.head(10))), "--out", str(w.path("m")), *ARGS], 2, "5 feature columns and 10 rows (9 to fit after train.val_fraction): a model of how the columns vary together needs at least 2 x (columns + 1) = 12 rows"),
    "train-3-rows": lambda w: (["train", str(_table(w, "tiny.csv", lambda d: d.head(3))), "--out", str(w.path("m")), *ARGS, "--set", "train.val_fraction=0.34"], 2, "and 3 rows (2 to fit"),
    "prepare-over-its-own-source": lambda w: (["prepare", "--set", f"data.source={_table(w, 'train.parquet')}", "--set", f"data.prepared_dir={w.tmp}"], 2, "is the input"),
}


def _sqlite_bytes() -> bytes:
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "s.db")
        conn.executescript("CREATE TABLE t (a, b); " + "INSERT INTO t VALUES (1, randomblob(500)); " * 40)
        conn.commit()
        conn.close()
        return (Path(tmp) / "s.db").read_bytes()


_SQLITE = _sqlite_bytes()  # a sound sqlite database, to cut short


def _damaged_store(w: Work, damage: Callable[[Path], object]) -> str:
    db = w.path("store.db")
    damage(db)
    w.env["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    return f"the MLflow store {db} is damaged"


def _env(w: Work, variable: str, value: str, culprit: str) -> str:
    w.env[variable] = value
    return culprit


def _int64_near_2_62(df: pd.DataFrame) -> pd.DataFrame:
    df["big"] = np.int64(2**62) + np.arange(len(df), dtype=np.int64)  # distinct, one value in float32
    return df


def _wide_csv(path: Path, columns: int, rows: int) -> Path:
    header = "sample_id," + ",".join(f"c{j}" for j in range(columns - 1))
    body = "".join(f"{i}," + ",".join(["1.5", "2.5"] * ((columns - 1) // 2) + ["0.5"] * ((columns - 1) % 2)) + "\n"
                   for i in range(rows))
    path.write_text(header + "\n" + body)
    return path


def _wide_parquet(path: Path, columns: int, rows: int) -> Path:
    values = np.random.default_rng(0).normal(size=(rows, columns - 1))
    df = pd.DataFrame(values, columns=[f"c{j}" for j in range(columns - 1)])
    df.insert(0, "sample_id", np.arange(rows))
    df.to_parquet(path, index=False)
    return path


def _days(folder: Path) -> Path:
    """A folder of two Parquet tables to embed."""
    folder.mkdir(parents=True)
    for name, seed in (("a.parquet", 4), ("b.parquet", 5)):
        clean_table(n=57, seed=seed).to_parquet(folder / name, index=False)
    (folder.parent / "README.txt").write_text("the user's notes\n")
    return folder


def _project(folder: Path) -> Path:
    (folder / "prepared").mkdir(parents=True)
    clean_table(n=30, seed=6).to_parquet(folder / "prepared" / "train.parquet", index=False)
    return folder


def _keep(folder: Path) -> Path:
    folder.mkdir()
    (folder / "keep.txt").write_text("keep me\n")
    return folder


def _cell(value: float) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def edit(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[7, "m1"] = value
        return df
    return edit


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _file(path: Path) -> Path:
    path.write_text("a file\n")
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _huge(df: pd.DataFrame) -> pd.DataFrame:
    df.loc[5, "m1"] = 1e39  # finite in float64, inf in float32
    return df


def _big(w: Work) -> Path:
    path = w.path("big.parquet")
    rng = np.random.default_rng(3)
    df = pd.DataFrame(rng.normal(size=(3000, 5)), columns=[f"m{j}" for j in range(5)])
    df.insert(0, "sample_id", np.arange(3000))
    df.to_parquet(path, index=False)
    return path


def _dup_parquet(w: Work) -> Path:
    path = w.path("dup.parquet")
    n = 60
    pq.write_table(pa.table([pa.array(range(n)), pa.array(np.ones(n)), pa.array(np.zeros(n))],
                            names=["sample_id", "m0", "m0"]), path)
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, trained, mounts, servers, tmp_path, monkeypatch, capsys):
    model, table = trained
    monkeypatch.chdir(tmp_path)  # no ./params.yaml, nothing written beside the repository
    work = Work(model=model, table=table, tmp=tmp_path / "work", mounts=mounts, servers=servers)
    work.tmp.mkdir()
    store = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).parent  # the session's store
    argv, expected, culprit = CASES[name](work)
    for key, value in work.env.items():
        monkeypatch.setenv(key, value)
    for key, value in HTTP_DEFAULTS.items():  # what the store probe sets, undone after the test
        monkeypatch.setenv(key, value)
    roots = [tmp_path, model, store, *(p for p in mounts.values() if p is not None)]
    before = _snapshot(*roots)
    started = time.monotonic()
    code = main(argv)
    seconds = time.monotonic() - started
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if not line.startswith("epoch ")]
    assert code == expected, err
    assert len(lines) == 1 and lines[0].startswith("vaepipe: error: "), err
    assert culprit in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert _snapshot(*roots) == before, "something was written, left behind or overwritten"
    if name.startswith(("store-", "registry-", "prefect-api-")):
        assert seconds < 20, f"a server that is down took {seconds:.1f} s to report"  # MLflow's defaults: minutes
        if name != "store-not-mlflow":  # it answers (HTTP 404): nothing to retry
            assert "3 attempts" in lines[0], lines[0]  # the bounded retry, reported


def test_float32_overflow_is_named_by_validate(trained, tmp_path, capsys):
    path = tmp_path / "big.parquet"
    _huge(clean_table(n=120, seed=2)).to_parquet(path, index=False)
    assert main(["validate", str(path), *ARGS]) == 1
    out = capsys.readouterr().out
    assert "column 'm1'" in out and "float32" in out and "(rows 5)" in out


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"), OSError(9, "Bad file descriptor"),
                                 KeyError("z_mean"), RuntimeError("CUDA error: an illegal memory access\nmore")])
def test_a_real_bug_stays_exit_3(bug, trained, monkeypatch, capsys):
    """Exit 3 is kept for bugs: a step raising what no user can fix is not dressed up as a user error."""
    from pipeline.stages import validate

    def broken(*args: object, **kwargs: object) -> None:
        raise bug

    monkeypatch.setattr(validate, "run", broken)
    assert main(["validate", str(trained[1])]) == 3
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaepipe: internal error: ") and "--debug" in lines[0]
    assert type(bug).__name__ in lines[0]


def test_debug_shows_the_traceback(trained, tmp_path, capsys):
    assert main(["train", str(trained[1]), "--out", str(tmp_path / "m"), "--set", "model.latent_dim=2.5", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_run_reports_a_user_error_without_prefect_tracebacks(prefect_harness, tmp_path, monkeypatch, capfd, caplog):
    """A user error inside the flow: Prefect logs the failed task and flow, but no traceback; one error line."""
    monkeypatch.chdir(tmp_path)
    work = Work(model=tmp_path, table=tmp_path, tmp=tmp_path, mounts={}, servers={})
    source = _csv(work, "dup.csv", "sample_id,alcohol,alcohol,b", rows=300)
    before = _snapshot(tmp_path)
    assert main(["run", *ARGS, "--set", f"data.source={source}"]) == 2
    out, err = capfd.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("vaepipe:")]
    assert errors == [errors[0]] and errors[0].startswith("vaepipe: error: ") and "'alcohol'" in errors[0], err
    assert "Traceback" not in err + out
    failed = [r for r in caplog.records if r.name.startswith("prefect.") and r.levelno >= logging.ERROR]
    assert any("Task run failed" in r.getMessage() for r in failed)  # Prefect still says what failed ...
    assert [r.exc_info for r in failed if r.exc_info] == []  # ... without a traceback
    assert _snapshot(tmp_path) == before


def test_prefect_server_that_does_not_start_is_one_line(tmp_path):
    """Prefect's local API server not up in time (real process, startup timeout 0): exit 2, one line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", *ARGS], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("vaepipe:")]
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1 and "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_a_librarys_warning_does_not_reach_the_terminal_raw(trained, tmp_path):
    """A crafted pickle as weights.pt: torch warns of its protocol (two lines) before vaepipe's
    error; in a real process (a warning shows once per process) only vaepipe's line is printed."""
    import pickle

    model, table = trained
    crafted = tmp_path / "m"
    shutil.copytree(model, crafted)
    (crafted / "weights.pt").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "pipeline", "embed", str(crafted), str(table), str(tmp_path / "e.parquet")]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()] and "weights.pt" in done.stderr, done.stderr
    debug = subprocess.run([*argv, "--debug"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "Detected pickle protocol 4" in debug.stderr  # the library's own words, with --debug


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write() fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics checked on Linux")
def test_file_size_limit_in_a_real_process(trained, tmp_path):
    """A disk that refuses more bytes (ulimit -f), through a real process: one line, exit 2, no file."""
    model, _ = trained
    out = tmp_path / "s.parquet"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pipeline", "sample", str(model), "20000", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=_limit_file_size)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "s.parquet" in done.stderr
    assert "File too large" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
