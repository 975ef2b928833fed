"""The gateway's test kit: a pytest plugin for the gateway's own tests and for
the tests of plugin packages.

Installing the gateway registers it with pytest (the ``pytest11`` entry point
``gateway``), so in that environment every test can ask for:

* ``gateway_client``: ``await gateway_client(**config)`` is an aiohttp test
  client of the real app, on a real socket, with its spool under ``tmp_path``;
* ``gateway_process``: ``await gateway_process(**config)`` runs ``gateway
  serve`` in a child process, on a free port;
* ``fake_destination`` and ``make_fake_destination``: a recording HTTP server
  that plays a destination's API, with scripted answers.

``config`` is what ``gateway_config`` takes.  The helpers beside the fixtures
send calls (``track``, ``post``, ``send``, ``send_batch``), read what the
gateway did (``metrics``, ``sample``, ``spool_calls``, ``spool_query``,
``dead_letters``) and wait for it (``wait_until``, on which every wait here is
built).  Everything listens on 127.0.0.1 only.

The async fixtures need pytest-aiohttp (and so pytest-asyncio).  The
gateway's own modules are imported when a fixture or helper first needs them,
not when pytest loads this plugin: a plugin that every pytest run of the
environment loads should cost those runs nothing, and coverage started after
the plugins were loaded must still see the gateway's module-level code.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator, Mapping, NamedTuple, \
    Sequence, TypeVar, overload

import aiohttp
import aiohttp.test_utils
import msgspec
import pytest
import yaml
from aiohttp import web

from gateway.units import shown

if TYPE_CHECKING:
    from aiohttp import ClientResponse
    from aiohttp.test_utils import TestClient

    from gateway.spool import DeadLetter

try:  # async fixtures that work in pytest-asyncio's strict mode as well as in auto mode
    from pytest_asyncio import fixture as async_fixture
except ImportError:  # pragma: no cover - without pytest-asyncio no async fixture can run anyway
    async_fixture = pytest.fixture  # type: ignore[assignment]

T = TypeVar("T")

#: the write key of the source ``web`` that ``gateway_config`` gives every gateway
WRITE_KEY = "test-write-key"
#: headers that authenticate a request as the source ``web``
AUTH_HEADERS = {"Authorization": f"Bearer {WRITE_KEY}"}
#: headers that ask for strict validation (Customer.io's ``X-Strict-Mode: 1``)
STRICT_HEADERS = {"X-Strict-Mode": "1"}
#: retries in tenths of a second, so that a test sees several in a moment
FAST_RETRY = {"backoff_base": 0.05, "backoff_cap": 0.2}
#: seconds ``gateway serve`` (and the app under ``gateway_client``) waits for
#: sends at shutdown: a destination that hangs never slows a teardown
SHUTDOWN_TIMEOUT = 1.0


# -- waiting ----------------------------------------------------------------------

@overload
async def wait_until(check: Callable[[], Awaitable[T]], *, what: str, timeout: float = 10.0,
                     event: asyncio.Event | None = None, seen: Callable[[], object] | None = None,
                     poll: float = 0.05) -> T: ...


@overload
async def wait_until(check: Callable[[], T], *, what: str, timeout: float = 10.0,
                     event: asyncio.Event | None = None, seen: Callable[[], object] | None = None,
                     poll: float = 0.05) -> T: ...


async def wait_until(check: Callable[[], Any], *, what: str, timeout: float = 10.0,
                     event: asyncio.Event | None = None, seen: Callable[[], object] | None = None,
                     poll: float = 0.05) -> Any:
    """Wait until ``check()`` (a function or a coroutine function) returns
    something true, and return that; after ``timeout`` seconds fail, saying
    what was awaited and what was seen (``seen()``, else ``check()``'s last answer).

    With an ``event`` the wait wakes when it is set (whoever changes what
    ``check`` looks at sets it) and looks again each second anyway; without
    one it looks every ``poll`` seconds.  Every wait of this kit is built on it,
    so that none is unbounded and each failure says what it was waiting for."""
    deadline = time.monotonic() + timeout
    while True:
        if event is not None:
            event.clear()  # before looking: a change after the look wakes the wait below
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            saw = seen() if seen is not None else got
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; saw {shown(saw, 1500)}")
        if event is None:
            await asyncio.sleep(min(poll, left))
        else:
            try:
                await asyncio.wait_for(event.wait(), min(1.0, left))
            except asyncio.TimeoutError:
                pass


async def wait_ready(url: str, *, timeout: float, poll: float = 0.5) -> None:
    """Wait until the live gateway at ``url`` says on ``/ready`` that it takes
    calls (200); a failure says what it answered last."""
    said: list[str] = []
    async with aiohttp.ClientSession() as http:
        async def ready() -> bool:
            async with http.get(f"{url}/ready") as r:
                said[:] = [f"{r.status} {await r.text()}"]
                return r.status == 200
        await wait_until(ready, what=f"{url}/ready to answer 200", timeout=timeout, poll=poll, seen=lambda: said)


def poll_window() -> float:
    """Seconds in which the delivery engine has run everything it runs now
    and then at least once (it looks at the retries table every
    ``gateway.delivery.worker.RETRY_POLL`` seconds), plus time for what that sends to
    arrive.  What has not happened in this window will not happen by itself:
    wait this long before asserting that something was sent once only."""
    from gateway.delivery import worker
    return worker.RETRY_POLL + 0.5


# -- config -----------------------------------------------------------------------

def spool_path(tmp_path: Path) -> Path:
    """Where ``gateway_config`` puts the spool of a test's gateway."""
    return tmp_path / "spool"


def webhook(name: str, url: str, **extra: Any) -> dict[str, Any]:
    """A ``webhook`` destination posting to ``url`` that sends at once and
    retries fast; ``extra`` sets other keys (a dict is merged into the default)."""
    d: dict[str, Any] = {"name": name, "type": "webhook", "settings": {"url": url},
                         "batch": {"max_wait": 0}, "retry": dict(FAST_RETRY)}
    for k, v in extra.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return d


#: blocks whose keys are merged into the defaults rather than replacing them
_MERGED = ("server", "storage")


def gateway_config(tmp_path: Path, yaml_text: str = "", /, *, server: dict[str, Any] | None = None,
                   storage: dict[str, Any] | None = None, sources: list[dict[str, Any]] | None = None,
                   transforms: list[dict[str, Any]] | None = None,
                   destinations: list[dict[str, Any]] | None = None, plugins: list[str] | None = None) -> str:
    """config.yaml for a test's gateway, from its blocks.

    The defaults: the spool under ``tmp_path/spool``, ``server.shutdown_timeout``
    of 1 s, one source ``web`` with ``WRITE_KEY``, no destination.  ``server``
    and ``storage`` are merged key by key into the defaults (``storage={"retention":
    3600}`` keeps delivered calls for the test to read); the other blocks
    replace them (``sources=[...]`` gives the test's own sources).  ``yaml_text``
    holds blocks as config.yaml writes them (a config copied from the docs),
    read first; the keyword arguments are applied after it."""
    doc: dict[str, Any] = {
        "server": {"shutdown_timeout": SHUTDOWN_TIMEOUT},
        "storage": {"path": str(spool_path(tmp_path))},
        "sources": [{"name": "web", "write_keys": [WRITE_KEY]}],
        "destinations": [],
    }
    written = yaml.safe_load(textwrap.dedent(yaml_text)) if yaml_text.strip() else {}
    if not isinstance(written, dict):
        raise ValueError(f"yaml_text must hold top-level keys of config.yaml, not {written!r}")
    given = {"server": server, "storage": storage, "sources": sources, "transforms": transforms,
             "destinations": destinations, "plugins": plugins}
    for blocks in (written, {k: v for k, v in given.items() if v is not None}):
        for key, value in blocks.items():
            doc[key] = {**doc[key], **value} if key in _MERGED and isinstance(value, dict) else value
    return yaml.safe_dump(doc, sort_keys=False)


# -- sending calls ----------------------------------------------------------------

def track(message_id: str, event: str = "Clicked", **fields: Any) -> dict[str, Any]:
    """A valid track call of user ``u1`` with this messageId; ``fields`` adds or overrides keys."""
    return {"type": "track", "userId": "u1", "event": event, "messageId": message_id, **fields}


class Answer(NamedTuple):
    """The gateway's answer to a POST: the status, the body (JSON decoded, else text)."""

    status: int
    body: Any
    response: ClientResponse


async def post(client: TestClient, path: str, payload: Any, *, strict: bool = False, auth: bool = True,
               headers: dict[str, str] | None = None) -> Answer:
    """POST ``payload`` (bytes as they are, anything else as JSON) to ``path``,
    as the source ``web`` unless ``auth`` is false; ``strict`` adds X-Strict-Mode: 1.
    Whatever the answer, it is returned: the ingest tests check every kind."""
    data = payload if isinstance(payload, (bytes, bytearray)) else msgspec.json.encode(payload)
    sent = {"Content-Type": "application/json", **(AUTH_HEADERS if auth else {}),
            **(STRICT_HEADERS if strict else {}), **(headers or {})}
    resp = await client.post(path, data=data, headers=sent)
    raw = await resp.read()
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        body = raw.decode(errors="replace")
    return Answer(resp.status, body, resp)


async def send(client: TestClient, call: dict[str, Any]) -> None:
    """POST one call to ``/v1/<its type>`` and require the 200 that means it is stored."""
    answer = await post(client, f"/v1/{call['type']}", call)
    assert answer.status == 200, answer.body


async def send_batch(client: TestClient, calls: list[dict[str, Any]]) -> None:
    """POST ``calls`` as one ``/v1/batch`` request and require its 200."""
    answer = await post(client, "/v1/batch", {"batch": calls})
    assert answer.status == 200, answer.body


# -- reading the gateway ------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def metrics(client: TestClient) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client's own parser,
    keyed by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    resp = await client.get("/metrics")
    assert resp.status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of one sample, None when /metrics does not have it."""
    return samples.get((name, tuple(sorted(labels.items()))))


async def wait_metric(client: TestClient, name: str, want: Callable[[float | None], bool], *,
                      timeout: float = 6.0, **labels: str) -> float | None:
    """Read /metrics until ``want(sample)``, and return the sample; backlog
    gauges are refreshed every 2 s, hence the default timeout."""
    last: list[float | None] = [None]

    async def look() -> bool:
        last[0] = sample(await metrics(client), name, **labels)
        return want(last[0])

    await wait_until(look, what=f"{name}{labels or ''} to be as wanted", timeout=timeout, poll=0.1,
                     seen=lambda: last[0])
    return last[0]


def spool_query(tmp_path: Path, sql: str, args: tuple[Any, ...] = (), *,
                file: str | None = None) -> list[tuple[Any, ...]]:
    """Rows of a read-only SQL query on the spool of the test's gateway (or on
    ``file`` of its directory), beside the running server (WAL lets both read)."""
    from gateway.spool.store import FILE

    conn = sqlite3.connect(f"file:{spool_path(tmp_path) / (file or FILE)}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def spool_calls(tmp_path: Path) -> list[dict[str, Any]]:
    """Every call the spool of the test's gateway holds, decoded, in order
    (none before the spool exists)."""
    from gateway.spool.sqlite_reads import stored_calls
    from gateway.spool.store import FILE

    if not (spool_path(tmp_path) / FILE).exists():
        return []
    return [msgspec.json.decode(c) for c in stored_calls(spool_path(tmp_path))]


def dead_letters(tmp_path: Path) -> list[DeadLetter]:
    """Every dead letter of the test's gateway, oldest first."""
    from gateway.config import StorageConfig
    from gateway.spool import open_dead_letters

    store = open_dead_letters(StorageConfig(path=str(spool_path(tmp_path))))
    try:
        return store.list()
    finally:
        store.close()


# -- the fake destination ------------------------------------------------------------

class ReceivedRequest(msgspec.Struct):
    """One request the fake destination received."""

    t: float  # time.monotonic() on arrival
    wall: float  # time.time() on arrival
    path: str
    headers: dict[str, str]
    json: Any  # the body, JSON decoded (else its text)
    status: int | None = None  # None: not answered (yet), or the connection was dropped


#: how the fake answers one request: a response, or None when it wrote none (a dropped connection)
Action = Callable[[web.Request, ReceivedRequest], Awaitable[web.StreamResponse | None]]


def status(code: int, text: str = "", headers: dict[str, str] | None = None) -> Action:
    """Answer ``code`` with ``text`` (a 200 without text is ``{}`` as JSON)."""
    async def act(request: web.Request, req: ReceivedRequest) -> web.StreamResponse:
        if code == 200 and not text:
            return web.json_response({}, headers=headers)
        return web.Response(status=code, text=text, headers=headers)
    return act


class FakeDestination:
    """A destination's API on 127.0.0.1 that records every request.

    ``script`` holds one action per request, used in order; ``default``
    answers the others (200 ``{}`` unless set).  Point a destination at ``url``
    (``settings.url`` of a webhook, ``settings.endpoint`` of most plugins)."""

    def __init__(self) -> None:
        self.requests: list[ReceivedRequest] = []
        self.script: list[Action] = []
        self.default: Action = status(200)
        self.url = ""
        #: set at teardown: every action that sleeps or hangs ends
        self.closing = asyncio.Event()
        #: set on every arrival and every answer (what the waits wake on)
        self.changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            doc = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            doc = raw.decode(errors="replace")
        req = ReceivedRequest(time.monotonic(), time.time(), request.path, dict(request.headers), doc)
        self.requests.append(req)
        self.changed.set()
        action = self.script.pop(0) if self.script else self.default
        resp = await action(request, req)
        if resp is None:  # the action dropped the connection: nothing is written
            return web.Response(status=499)
        req.status = resp.status
        self.changed.set()
        return resp

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or until teardown."""
        try:
            await asyncio.wait_for(self.closing.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def delivered(self) -> list[dict[str, Any]]:
        """The calls of every ``{"batch": [...]}`` request answered 2xx, in
        arrival order (what a webhook destination delivered); other bodies are
        left out (look at ``requests`` for those)."""
        return [c for r in self.requests if r.status is not None and 200 <= r.status < 300
                and isinstance(r.json, dict) and isinstance(r.json.get("batch"), list) for c in r.json["batch"]]

    async def wait_requests(self, n: int, timeout: float = 10.0) -> list[ReceivedRequest]:
        """Every request, once at least ``n`` have arrived."""
        await wait_until(lambda: len(self.requests) >= n, what=f"{n} requests at the fake destination",
                         timeout=timeout, event=self.changed, seen=lambda: self._summary())
        return self.requests

    async def wait_delivered(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every delivered call (``delivered()``), once at least ``n`` are."""
        await wait_until(lambda: len(self.delivered()) >= n, what=f"{n} calls delivered to the fake destination",
                         timeout=timeout, event=self.changed, seen=lambda: self._summary())
        return self.delivered()

    async def wait_quiet(self, seconds: float | None = None, timeout: float | None = None) -> list[ReceivedRequest]:
        """Every request, once none has arrived for ``seconds`` (from now at
        the earliest; ``poll_window()`` unless given): the way to wait before
        asserting that nothing more is sent (no retry, no duplicate).  Fails
        when the destination is never quiet that long within ``timeout``."""
        window = poll_window() if seconds is None else seconds
        since = time.monotonic()

        def quiet() -> bool:
            last = max([since] + [r.t for r in self.requests[-1:]])
            return time.monotonic() - last >= window

        await wait_until(quiet, what=f"{window:.2f}s without a request at the fake destination",
                         timeout=timeout if timeout is not None else max(10.0, 5 * window),
                         seen=lambda: self._summary())
        return self.requests

    def _summary(self) -> str:
        now = time.monotonic()
        return (f"{len(self.requests)} requests, answered {[r.status for r in self.requests][-20:]} (last 20), "
                f"{len(self.delivered())} calls delivered, the last request "
                + (f"{now - self.requests[-1].t:.2f}s ago" if self.requests else "never"))


def sleep_then(fake: FakeDestination, seconds: float, then: Action | None = None) -> Action:
    """Answer after ``seconds`` (or at teardown) with ``then`` (a 200 by default): a slow API."""
    async def act(request: web.Request, req: ReceivedRequest) -> web.StreamResponse | None:
        await fake.sleep(seconds)
        return await (then or status(200))(request, req)
    return act


def hang_until(fake: FakeDestination, release: asyncio.Event, then: Action | None = None) -> Action:
    """Answer only once ``release`` is set (or at teardown, or after 30 s): an API that hangs."""
    async def act(request: web.Request, req: ReceivedRequest) -> web.StreamResponse | None:
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
    async def act(request: web.Request, req: ReceivedRequest) -> None:
        transport = request.transport
        assert transport is not None
        if reset:
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.close()
        return None
    return act


@pytest.fixture
def make_fake_destination(aiohttp_server: Any) -> Iterator[Callable[[], Awaitable[FakeDestination]]]:
    """``await make_fake_destination()``: one more fake destination, for a test with several."""
    made: list[FakeDestination] = []

    async def make() -> FakeDestination:
        fake = FakeDestination()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", fake.handle)
        server = await aiohttp_server(app, host="127.0.0.1")
        fake.url = str(server.make_url("/hook"))
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.closing.set()


@async_fixture
async def fake_destination(make_fake_destination: Callable[[], Awaitable[FakeDestination]]) -> FakeDestination:
    """A fake destination, running (see ``FakeDestination``)."""
    return await make_fake_destination()


# -- the app, in process ----------------------------------------------------------------

class GatewayTestServer(aiohttp.test_utils.TestServer):
    """aiohttp's TestServer serving ``app`` as ``gateway serve`` does (the
    HTTP fast path first: gateway/http_fast_path.py)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        from gateway.http_fast_path import GatewayRunner

        return GatewayRunner(self.app, **kwargs)


@pytest.fixture
def gateway_client(aiohttp_client: Any, tmp_path: Path) -> Callable[..., Awaitable[TestClient]]:
    """``await gateway_client(**config)``: an aiohttp test client of the real
    app built from ``gateway_config(tmp_path, **config)``, its delivery running;
    closed (and the app shut down) at teardown."""
    async def make(yaml_text: str = "", /, **config: Any) -> TestClient:
        from gateway import config as config_mod
        from gateway.app import create_app

        app = create_app(config_mod.loads(gateway_config(tmp_path, yaml_text, **config)))
        client: TestClient = await aiohttp_client(GatewayTestServer(app))
        return client
    return make


# -- the gateway as a process ------------------------------------------------------------

def gateway_import_root() -> Path:
    """The directory the ``gateway`` package of this test run is imported from."""
    import gateway
    return Path(gateway.__file__).resolve().parent.parent


def child_env(*pythonpath: str | Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``python -m gateway`` child: this run's gateway
    first on PYTHONPATH (then ``pythonpath``, then the inherited PYTHONPATH)."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths = [str(gateway_import_root()), *map(str, pythonpath), *inherited]
    return {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """``gateway serve`` in a child process on 127.0.0.1:``port``; its
    output goes to ``log``."""

    def __init__(self, config_path: Path, port: int, env: Mapping[str, str] | None = None,
                 args: Sequence[str] = ()) -> None:
        self.config_path = config_path
        self.port = port
        self.args = list(args)  # more options of gateway serve (--workers N)
        self.url = f"http://127.0.0.1:{port}"
        self.env = child_env(env=env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config_path.parent / f"gateway-{port}.log"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    async def start(self, timeout: float = 20.0) -> GatewayProcess:
        """Start it; return once it accepts connections."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path),
                 "--port", str(self.port), *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.config_path.parent)
        proc = self.proc

        async def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"gateway serve exited with {proc.returncode}:\n{self.log_tail()}")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 1.0)
            except (OSError, asyncio.TimeoutError):
                return False
            writer.close()
            return True

        await wait_until(listening, what=f"gateway serve to listen on 127.0.0.1:{self.port}", timeout=timeout,
                         seen=lambda: f"its log:\n{self.log_tail()}")
        return self

    def writer_pid(self) -> int:
        """The spool's writer process (the server's one child)."""
        assert self.proc is not None
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(kids) == 1, f"expected one child (the spool writer), found {kids}"
        return int(kids[0])

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM; the exit code (blocks: call it in a thread while the test's
        servers must go on answering)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., Awaitable[GatewayProcess]]]:
    """``await gateway_process(**config)``: a real ``gateway serve`` of
    ``gateway_config(tmp_path, **config)`` (written to ``tmp_path/config.yaml``),
    on ``port=`` or a free one, with ``env=`` added to its environment and
    ``args=`` to its command line; killed at teardown.  Called again, it
    starts another on the same spool."""
    started: list[GatewayProcess] = []

    async def start(yaml_text: str = "", /, *, port: int | None = None, env: Mapping[str, str] | None = None,
                    args: Sequence[str] = (), **config: Any) -> GatewayProcess:
        path = tmp_path / "config.yaml"
        path.write_text(gateway_config(tmp_path, yaml_text, **config))
        process = GatewayProcess(path, port or free_port(), env, args)
        started.append(process)
        return await process.start()

    yield start
    for process in started:
        process.kill()


class CliResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


async def gateway_cli(*args: str, stdin: bytes | None = None, cwd: Path | None = None,
                      pythonpath: Sequence[str | Path] = (), timeout: float = 30.0) -> CliResult:
    """``python -m gateway ARGS`` (``check``, ``explain``, ``dlq ...``) as a
    child process, without blocking the event loop that the test's servers
    answer on; ``pythonpath`` makes more modules importable to it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=cwd, env=child_env(*pythonpath))
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"gateway {' '.join(args)} did not finish within {timeout}s") from None
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())
