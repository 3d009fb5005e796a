"""A real MLflow tracking server that stops answering in the middle of `vaepipe register`.

The server (`mlflow server` on 127.0.0.1) is reached through a TCP proxy that, once the request
creating the model version has reached the server and been answered there, drops every
connection and refuses new ones: the version exists on the server, the client never hears of it.
The command must end after bounded retries with one line, and a rerun against the working
server must finish that registration instead of registering a duplicate version.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline.cli import main
from tests.pipeline.helpers import FAST, clean_table
from tests.pipeline.servers import free_port

NAME = "remote-vae"
ARGS = [a for s in [*FAST, "train.epochs=2", "data.id_columns=[sample_id]", f"register.model_name={NAME}"]
        for a in ("--set", s)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.communicate(timeout=30)
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])


class CutProxy:
    """127.0.0.1:port -> the server; after the request containing `marker` is answered upstream,
    nothing more gets through: its answer is dropped, open connections closed, new ones refused.
    With `stall`, answers to requests containing `marker` are dropped and the connection kept open
    (a server that hangs); everything else gets through."""

    def __init__(self, upstream: int, marker: bytes, stall: bool = False) -> None:
        self.upstream, self.marker, self.stall, self.cut = upstream, marker, stall, threading.Event()
        self.cut_at: float | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self.sockets += [client, server]
            marked = threading.Event()
            threading.Thread(target=self._pipe, args=(client, server, marked, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, marked, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, marked: threading.Event, request: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if request and self.marker in data:
                    marked.set()
                if not request and marked.is_set():
                    if self.stall:  # the answer is held back: the client waits for its read timeout
                        continue
                    self._cut()  # the server answered: the version exists
                    return
                dst.sendall(data)
            # one side closed (the server ends an idle keep-alive connection after a few seconds):
            # pass the close on, or the client reuses a pooled connection nobody answers any more
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _cut(self) -> None:
        self.cut_at = time.monotonic()
        self.cut.set()
        with contextlib.suppress(OSError):  # shutdown wakes the other thread's accept(); close alone does not
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def test_a_server_lost_mid_registration_gives_one_line_and_the_rerun_no_duplicate(
        server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean_table(seed=1).to_parquet(tmp_path / "train.parquet", index=False)
    model = tmp_path / "model"
    assert main(["train", str(tmp_path / "train.parquet"), "--out", str(model), *ARGS]) == 0
    monkeypatch.chdir(tmp_path)
    proxy = CutProxy(int(server.rsplit(":", 1)[1]), b"/model-versions/create")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{proxy.port}")
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)  # vaepipe's bounded defaults, not a test's
    capsys.readouterr()
    code = main(["register", str(model), *ARGS])
    ended, err = time.monotonic(), capsys.readouterr().err
    assert proxy.cut_at is not None, err  # the fault happened where it was meant to
    assert code == 2, err
    ours = [line for line in err.splitlines() if line.startswith("vaepipe")]
    assert ours == [err.strip().splitlines()[-1]] and "Traceback" not in err, err  # one line, the last
    assert ours[0].startswith("vaepipe: error: ") and f"127.0.0.1:{proxy.port}" in ours[0] and "rerun" in ours[0]
    assert ended - proxy.cut_at < 30, ended - proxy.cut_at  # bounded retries (MLflow's defaults: over 4 min)

    client = MlflowClient(tracking_uri=server, registry_uri=server)
    assert [v.version for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]  # created, unanswered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)  # the store works again
    assert main(["register", str(model), *ARGS]) == 0, capsys.readouterr().err
    assert "version 1" in capsys.readouterr().out
    assert [v.version for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]  # no duplicate
    assert client.get_model_version_by_alias(NAME, "challenger").version == "1"
    shutil.rmtree(tmp_path / "mlflow", ignore_errors=True)


def test_a_server_that_hangs_mid_registration_gives_one_line_naming_the_timeout(
        server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The server takes the request logging the model and never answers: after the read timeout
    (and MLflow's retries) the command ends with exit 2 and one line that names the timeout, not an
    internal error; no version is registered."""
    clean_table(seed=2).to_parquet(tmp_path / "train.parquet", index=False)
    model = tmp_path / "model"
    name = f"{NAME}-hung"
    args = [*ARGS, "--set", f"register.model_name={name}"]
    assert main(["train", str(tmp_path / "train.parquet"), "--out", str(model), *args]) == 0
    monkeypatch.chdir(tmp_path)
    proxy = CutProxy(int(server.rsplit(":", 1)[1]), b"/logged-models", stall=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    capsys.readouterr()
    started = time.monotonic()
    code = main(["register", str(model), *args])
    took, err = time.monotonic() - started, capsys.readouterr().err
    assert code == 2, err
    ours = [line for line in err.splitlines() if line.startswith("vaepipe")]
    assert ours == [err.strip().splitlines()[-1]] and "Traceback" not in err, err
    assert ours[0].startswith("vaepipe: error: the MLflow store did not answer "), ours
    assert f"127.0.0.1:{proxy.port}" in ours[0] and "within 2 s" in ours[0] and "rerun" in ours[0], ours
    assert took < 60, took
    client = MlflowClient(tracking_uri=server, registry_uri=server)
    assert client.search_model_versions(f"name = '{name}'") == []
    shutil.rmtree(tmp_path / "mlflow", ignore_errors=True)
