"""Start `twin serve` as a real process on 127.0.0.1 and stop it by its PID.

A test talks to it over HTTP with httpx, as a plant system would. The token goes through the
environment (TWIN_SERVE_TOKENS), never argv; the server's output goes to a log file whose
tail is shown when it fails to become ready. `in_process` runs the same app in the test's own
event loop instead, for tests that reach into the service while it answers.
"""

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import httpx
from fastapi import FastAPI

from serving.app import create_app
from serving.service import Service
from serving.settings import load_settings
from tests.training.twin_cli import TWIN

TOKEN = "test-token-0123456789"
READY_TIMEOUT_S = 120  # torch + FastAPI import and the twin load, on a busy 2-core machine


class Server(NamedTuple):
    url: str
    process: subprocess.Popen
    log: Path

    def client(self, token: str | None = TOKEN, timeout: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text()[-chars:] if self.log.exists() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(folder: Path, *overrides: str, token: str | None = TOKEN) -> subprocess.Popen:
    """`twin serve <overrides>` in folder, output to folder/serve.log (not waited for)."""
    env = {**os.environ, "TWIN_SERVE_TOKENS": token or ""}
    env.pop("TWIN_CONFIG_DIR", None)
    with open(folder / "serve.log", "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen([str(TWIN), "serve", *overrides], cwd=folder, env=env,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def start_server(folder: Path, *overrides: str, token: str | None = TOKEN) -> Server:
    """A ready server on a free loopback port.

    Raises:
        RuntimeError: it exited or was not ready within READY_TIMEOUT_S (log tail attached).
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = run_serve(folder, "host=127.0.0.1", f"port={port}", *overrides, token=token)
    server = Server(f"http://127.0.0.1:{port}", process, folder / "serve.log")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"twin serve exited with {process.returncode}:\n"
                               f"{server.log_tail()}")  # fmt: skip
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"twin serve not ready after {READY_TIMEOUT_S} s:\n{server.log_tail()}")


def stop_server(server: Server) -> int:
    """SIGTERM (graceful), then SIGKILL after 20 s; returns the exit code."""
    if server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(server.process.pid, signal.SIGKILL)
            server.process.wait(10)
    return server.process.returncode


class InProcess(NamedTuple):
    client: httpx.AsyncClient
    service: Service
    app: FastAPI


@contextlib.asynccontextmanager
async def in_process(model_uri: Path, **settings) -> AsyncIterator[InProcess]:
    """The app `twin serve` runs, started (lifespan) in this event loop, with an httpx client
    that calls it through ASGI (no socket) carrying the token, and its `Service`: for tests
    that reach into the batcher, the registry or the housekeeping while it answers.

    Args:
        model_uri: the twin file (served as TorchScript unless `format` says otherwise).
        settings: configs/serve.yaml keys (sessions={"max_sessions": 1}, ...).
    """
    config = {"model_uri": str(model_uri), "format": "torchscript", "tokens": [TOKEN],
              **settings}  # fmt: skip
    app = create_app(load_settings(config, environ={}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process",
                                     headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=60) as client:  # fmt: skip
            yield InProcess(client, app.state.service, app)
