"""Helpers for the delivery, routing, transform, DLQ and plugin tests: a fake
destination server whose answers are scripted coroutines (so it can sleep,
hang or drop the connection), a config builder, a /metrics reader and a
bounded wait.  Everything listens on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import struct
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import msgspec
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from waiting import wait_on

WRITE_KEY = "test-write-key"  # the key conftest.config_text gives the source "web"
AUTH = {"Authorization": f"Bearer {WRITE_KEY}"}
TESTS = Path(__file__).resolve().parent
PLUGINS_DIR = TESTS / "plugins"

#: fast retries for tests
FAST_RETRY = {"backoff_base": 0.05, "backoff_cap": 0.2}


# -- config ------------------------------------------------------------------

def webhook(name: str, url: str, **extra: Any) -> dict[str, Any]:
    """A webhook destination that sends at once and retries fast."""
    d: dict[str, Any] = {"name": name, "type": "webhook", "settings": {"url": url},
                         "batch": {"max_wait": 0}, "retry": dict(FAST_RETRY)}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return d


def body(destinations: list[dict[str, Any]] = (), **top: Any) -> str:  # type: ignore[assignment]
    """Top-level YAML for ``gateway_client``/``gateway_process``; the server
    stops its workers within 1 s so a hung fake never slows a teardown."""
    doc: dict[str, Any] = {"server": {"shutdown_timeout": 1.0}, "destinations": list(destinations)}
    for k, v in top.items():
        if k == "server":
            doc["server"].update(v)
        else:
            doc[k] = v
    return yaml.safe_dump(doc, sort_keys=False)


# -- the fake destination --------------------------------------------------------

class Req(msgspec.Struct):
    """One request the fake received."""

    t: float  # time.monotonic() on arrival
    wall: float  # time.time() on arrival
    path: str
    headers: dict[str, str]
    json: Any
    status: int | None = None  # None: the connection was dropped, or no answer yet


Action = Callable[[web.Request, Req], Awaitable[web.StreamResponse | None]]


class Fake:
    """A destination API on 127.0.0.1.  ``script`` holds one action per
    request (consumed in order), ``default`` answers the rest."""

    def __init__(self) -> None:
        self.requests: list[Req] = []
        self.script: list[Action] = []
        self.default: Action = status(200)
        self.closing = asyncio.Event()  # set at teardown: every sleeping action ends
        self.arrived = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            doc = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            doc = raw.decode(errors="replace")
        req = Req(time.monotonic(), time.time(), request.path, dict(request.headers), doc)
        self.requests.append(req)
        self.arrived.set()
        action = self.script.pop(0) if self.script else self.default
        resp = await action(request, req)
        if resp is None:  # the action dropped the connection: nothing is written
            return web.Response(status=499)
        req.status = resp.status
        return resp

    async def sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.closing.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def wait_requests(self, n: int, timeout: float = 10.0) -> list[Req]:
        await wait_on(self.arrived, lambda: len(self.requests) >= n, timeout,
                      lambda: f"the fake got {len(self.requests)} requests, expected {n}")
        return self.requests

    def answered(self, code: int = 200) -> list[Req]:
        return [r for r in self.requests if r.status == code]

    def delivered(self) -> list[dict[str, Any]]:
        """The calls of every webhook batch answered 2xx, in arrival order."""
        return [c for r in self.requests if r.status is not None and 200 <= r.status < 300
                for c in r.json["batch"]]


def status(code: int, text: str = "", headers: dict[str, str] | None = None) -> Action:
    async def act(request: web.Request, req: Req) -> web.StreamResponse:
        if code == 200 and not text:
            return web.json_response({}, headers=headers)
        return web.Response(status=code, text=text, headers=headers)
    return act


def sleep_then(fake: Fake, seconds: float, then: Action | None = None) -> Action:
    """Answer after ``seconds`` (or at teardown)."""
    async def act(request: web.Request, req: Req) -> web.StreamResponse | None:
        await fake.sleep(seconds)
        return await (then or status(200))(request, req)
    return act


def hang_until(fake: Fake, release: asyncio.Event, then: Action | None = None) -> Action:
    async def act(request: web.Request, req: Req) -> web.StreamResponse | None:
        waiter = asyncio.ensure_future(release.wait())
        closer = asyncio.ensure_future(fake.closing.wait())
        try:
            await asyncio.wait({waiter, closer}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            closer.cancel()
        return await (then or status(200))(request, req)
    return act


def drop_connection(reset: bool = False) -> Action:
    """Close the connection without an answer; ``reset`` sends a TCP RST
    (SO_LINGER 0) rather than a FIN."""
    async def act(request: web.Request, req: Req) -> None:
        transport = request.transport
        assert transport is not None
        if reset:
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.close()
        return None
    return act


@pytest.fixture
async def fake(aiohttp_server: Any) -> Any:
    """A scripted fake destination on 127.0.0.1."""
    f = Fake()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", f.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    f.url = str(server.make_url("/hook"))
    yield f
    f.closing.set()


@pytest.fixture
def make_fake(aiohttp_server: Any) -> Any:
    """More fakes: ``await make_fake()``."""
    made: list[Fake] = []

    async def make() -> Fake:
        f = Fake()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", f.handle)
        server = await aiohttp_server(app, host="127.0.0.1")
        f.url = str(server.make_url("/hook"))
        made.append(f)
        return f
    yield make
    for f in made:
        f.closing.set()


# -- reading the gateway ------------------------------------------------------------

async def metrics(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    resp = await client.get("/metrics")
    assert resp.status == 200
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(await resp.text()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(ms: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return ms.get((name, tuple(sorted(labels.items()))))


async def wait_metric(client: Any, name: str, want: Callable[[float | None], bool], timeout: float = 6.0,
                      **labels: str) -> float | None:
    """Poll /metrics until the sample satisfies ``want`` (backlog gauges are
    refreshed every 2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        got = sample(await metrics(client), name, **labels)
        if want(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} is {got} after {timeout}s")
        await asyncio.sleep(0.1)


async def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def spool_file(tmp_path: Path) -> Path:
    """conftest.config_text puts the spool at tmp_path/spool."""
    return tmp_path / "spool" / "spool.sqlite3"


def query(tmp_path: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A read-only look at the spool, beside the running server."""
    conn = sqlite3.connect(f"file:{spool_file(tmp_path)}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def track(message_id: str, event: str = "Clicked", **extra: Any) -> dict[str, Any]:
    return {"type": "track", "userId": "u1", "event": event, "messageId": message_id, **extra}


async def post(client: Any, call: dict[str, Any]) -> None:
    resp = await client.post(f"/v1/{call['type']}", json=call, headers=AUTH)
    assert resp.status == 200, await resp.text()


async def post_batch(client: Any, calls: list[dict[str, Any]]) -> None:
    resp = await client.post("/v1/batch", json={"batch": calls}, headers=AUTH)
    assert resp.status == 200, await resp.text()
