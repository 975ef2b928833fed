"""Fixtures that build real things: configs on disk, the real app on a real
socket, a gateway process, and local sinks that record what they receive."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import msgspec
import pytest
from aiohttp import web

from gateway import config as config_mod
from gateway.app import create_app
from gateway.config import Config
from waiting import wait_on

ROOT = Path(__file__).resolve().parent.parent
WRITE_KEY = "test-write-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_text(tmp_path: Path, body: str = "", *, sources: str | None = None) -> str:
    """A config with a spool under tmp_path; ``body`` adds top-level keys."""
    src = sources if sources is not None else f"""
        sources:
          - name: web
            write_keys: ["{WRITE_KEY}"]
        """
    return textwrap.dedent(f"""
        storage:
          path: {tmp_path / 'spool'}
        """) + textwrap.dedent(src) + textwrap.dedent(body)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    def make(body: str = "", **kw: Any) -> Config:
        return config_mod.loads(config_text(tmp_path, body, **kw))
    return make


@pytest.fixture
def gateway_client(aiohttp_client: Any, make_config: Callable[..., Config]) -> Callable[..., Any]:
    """``await gateway_client(yaml_body)`` → an aiohttp test client of the real app."""
    async def make(body: str = "", **kw: Any) -> Any:
        return await aiohttp_client(create_app(make_config(body, **kw)))
    return make


class Sink:
    """A local HTTP server that records every request; ``script`` answers them."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[Callable[[web.Request, bytes], web.StreamResponse | None]] = []
        self.default: Callable[[web.Request, bytes], web.StreamResponse] = \
            lambda r, b: web.json_response({})
        self.received = asyncio.Event()
        self.url = ""

    @property
    def calls(self) -> list[dict[str, Any]]:
        """Every call delivered with a 2xx, in arrival order."""
        out = []
        for r in self.requests:
            if 200 <= r["status"] < 300:
                out.extend(r["json"]["batch"])
        return out

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        resp = self.script.pop(0)(request, body) if self.script else None
        if resp is None:
            resp = self.default(request, body)
        try:
            doc = msgspec.json.decode(body)
        except msgspec.DecodeError:
            doc = None
        self.requests.append({"path": request.path, "headers": dict(request.headers), "json": doc,
                              "status": resp.status})
        self.received.set()
        return resp

    async def wait_for(self, n_calls: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        await wait_on(self.received, lambda: len(self.calls) >= n_calls, timeout,
                      lambda: f"sink got {len(self.calls)} calls, expected {n_calls}")
        return self.calls


@pytest.fixture
async def sink(aiohttp_server: Any) -> AsyncIterator[Sink]:
    s = Sink()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", s.handle)
    server = await aiohttp_server(app)
    s.url = str(server.make_url("/hook"))
    yield s


class GatewayProcess:
    """``gateway serve`` in a child process, on a free port."""

    def __init__(self, cfg_path: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.cfg_path = cfg_path
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = cfg_path.parent / f"gateway-{port}.log"

    def start(self, timeout: float = 20.0) -> "GatewayProcess":
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.cfg_path), "--port", str(self.port)],
            stdout=logf, stderr=subprocess.STDOUT, env=self.env, cwd=self.cfg_path.parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("gateway did not start listening")

    def writer_pid(self) -> int:
        """The spool's writer process (the server's one child)."""
        assert self.proc is not None
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(kids) == 1, f"expected one child (the spool writer), found {kids}"
        return int(kids[0])

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """``gateway_process(yaml_body)`` starts a real ``gateway serve``."""
    procs: list[GatewayProcess] = []

    def start(body: str = "", *, port: int | None = None, **kw: Any) -> GatewayProcess:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(config_text(tmp_path, body, **kw))
        p = GatewayProcess(cfg, port or free_port()).start()
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
