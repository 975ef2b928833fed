"""``gateway serve --workers N``: N server processes on one port.

The process ``gateway serve`` starts is the first worker: it runs delivery,
the debugger and, on the SQLite backend, the spool's writer, as with one
worker.  It starts N-1 ingest workers (``python -m gateway.worker_main``), each
listening on the same port with SO_REUSEPORT, so the kernel spreads
connections over them.  An ingest worker decodes, checks, enriches and
stores calls, and does nothing else:

- SQLite: it hands its appends to the first worker's writer over a socket
  in a private directory; the writer commits the calls of every worker in
  one group, so a 200 from any worker means the same as from the first.
- NATS JetStream: it publishes to the stream itself, one more publisher.

``/metrics`` and ``/ready`` (and ``/debugger``) are answered by the first
worker whichever worker a scrape reaches (the others pass them on over
the private directory): the first worker adds every worker's ingest
counters to its own, and ``/ready`` fails while a worker is not running.
An ingest worker that dies is started again; SIGTERM to the first worker
drains every worker, then itself; its death takes the others with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
from aiohttp import web

from gateway.errors import error_body
from gateway.metrics import Counters
from gateway.spool import spool_problems

if TYPE_CHECKING:
    from gateway.activity import ActivityFeed
    from gateway.spool import Spool

log = logging.getLogger("gateway.workers")

RELAY_EVERY = 1.0  # seconds between an ingest worker's looks at whether the debugger is watched
RESTART_AFTER = (0.2, 1.0, 5.0)  # seconds before starting a worker that died again, by try
ASK_TIMEOUT = 2.0  # seconds a worker has to answer the first one (counters, readiness)
#: the paths an ingest worker passes on to the first worker
FIRST_WORKER_PATHS = ("/metrics", "/ready", "/debugger")


class Runtime:
    """The private directory (mode 0700) the workers of one server talk through."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls) -> "Runtime":
        """A new directory; those of servers that were killed (kill -9 leaves
        them behind) are removed."""
        base = Path(tempfile.gettempdir())
        for old in base.glob("gateway-workers-*-*"):
            pid = old.name.split("-")[2]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists() and old.stat().st_uid == os.getuid():
                shutil.rmtree(old, ignore_errors=True)
        return cls(Path(tempfile.mkdtemp(prefix=f"gateway-workers-{os.getpid()}-")))

    @property
    def writer(self) -> str:
        return str(self.path / "writer.sock")

    @property
    def first(self) -> str:
        return str(self.path / "first.sock")

    @property
    def first_control(self) -> str:
        return str(self.path / "first-control.sock")

    def worker(self, index: int) -> str:
        return str(self.path / f"worker-{index}.sock")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class CountersDoc(msgspec.Struct, array_like=True):
    """An ingest worker's counters on the wire (the commit histogram stays
    with the first worker, which hears of every group commit)."""

    requests: list[tuple[str, int, int]]
    accepted: dict[str, int]
    deduplicated: dict[str, int]
    rejected: dict[str, int]
    dropped: dict[str, int]
    sdk_metrics: int


def counters_doc(c: Counters) -> bytes:
    return msgspec.msgpack.encode(CountersDoc([(e, s, n) for (e, s), n in c.requests.items()], c.accepted,
                                              c.deduplicated, c.rejected, c.dropped, c.sdk_metrics))


_counters_decoder = msgspec.msgpack.Decoder(CountersDoc)


def add_counters(total: Counters, body: bytes) -> None:
    """Add one worker's counters (``counters_doc``) to ``total``."""
    doc = _counters_decoder.decode(body)
    for endpoint, status, n in doc.requests:
        total.requests[(endpoint, status)] = total.requests.get((endpoint, status), 0) + n
    for mine, theirs in ((total.accepted, doc.accepted), (total.deduplicated, doc.deduplicated),
                         (total.rejected, doc.rejected), (total.dropped, doc.dropped)):
        for k, n in theirs.items():
            mine[k] = mine.get(k, 0) + n
    total.sdk_metrics += doc.sdk_metrics


def summed(own: Counters, others: dict[int, bytes]) -> Counters:
    """The first worker's counters with every other worker's added, and
    the HTTP requests each worker answered (``by_worker``)."""
    total = Counters()
    total.requests, total.accepted = dict(own.requests), dict(own.accepted)
    total.deduplicated, total.rejected, total.dropped = dict(own.deduplicated), dict(own.rejected), dict(own.dropped)
    total.sdk_metrics, total.commits, total.commit_sum = own.sdk_metrics, own.commits, own.commit_sum
    total.by_worker = {"0": sum(own.requests.values())}
    for index, body in sorted(others.items()):
        before = sum(total.requests.values())
        add_counters(total, body)
        total.by_worker[str(index)] = sum(total.requests.values()) - before
    return total


class WorkerPool:
    """The first worker's view of the others: starts them, starts again the
    ones that die, asks them for their counters and health, stops them."""

    def __init__(self, n: int, config_path: str, host: str, port: int, runtime: Runtime) -> None:
        self.n = n
        self.config_path, self.host, self.port = config_path, host, port
        self.runtime = runtime
        self.procs: dict[int, asyncio.subprocess.Process | None] = {i: None for i in range(1, n)}
        self.restarts = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._sessions: dict[int, aiohttp.ClientSession] = {}

    def writer_listener(self) -> socket.socket:
        """The socket the SQLite writer accepts the other workers on."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.runtime.writer)
        sock.listen(64)
        sock.set_inheritable(True)
        return sock

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep(i), name=f"worker-{i}") for i in self.procs]

    async def _keep(self, index: int) -> None:
        for attempt in itertools.count():
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.worker_main", "--config", self.config_path, "--host", self.host,
                "--port", str(self.port), "--runtime", str(self.runtime.path), "--index", str(index),
                "--parent", str(os.getpid()), stdin=asyncio.subprocess.DEVNULL)
            self.procs[index] = proc
            code = await proc.wait()
            self.procs[index] = None
            if self._stopping:
                return
            self.restarts += 1
            wait = RESTART_AFTER[min(attempt, len(RESTART_AFTER) - 1)]
            log.error("worker %d exited (code %s); starting it again in %.1fs", index, code, wait)
            await asyncio.sleep(wait)

    async def stop(self, timeout: float) -> None:
        """SIGTERM to every worker (each drains its requests), then wait."""
        self._stopping = True
        for proc in self.procs.values():
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for proc in self.procs.values():
                if proc is not None and proc.returncode is None:
                    log.error("a worker did not stop within %.0fs; killing it", timeout)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for s in self._sessions.values():
            await s.close()
        self._sessions.clear()

    def _session(self, index: int) -> aiohttp.ClientSession:
        s = self._sessions.get(index)
        if s is None or s.closed:
            s = self._sessions[index] = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.runtime.worker(index)),
                timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT))
        return s

    async def _ask(self, index: int, path: str) -> tuple[int, bytes]:
        async with self._session(index).get(f"http://worker{path}") as resp:
            return resp.status, await resp.read()

    async def counters(self) -> dict[int, bytes]:
        """Every running worker's counters (``counters_doc``) by index; one
        that does not answer in time is left out of this scrape (and fails /ready)."""
        got = await asyncio.gather(*(self._ask(i, "/counters") for i in self.procs), return_exceptions=True)
        return {i: r[1] for i, r in zip(self.procs, got) if isinstance(r, tuple) and r[0] == 200}

    async def problems(self) -> list[str]:
        """Why some worker cannot take calls now, one line each."""
        async def one(index: int) -> str | None:
            if self.procs[index] is None:
                return f"worker {index} of {self.n} is not running (starting it again)"
            try:
                status, body = await self._ask(index, "/ready")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                return f"worker {index} of {self.n} does not answer: {e or type(e).__name__}"
            return None if status == 200 else f"worker {index} of {self.n}: {body.decode(errors='replace')}"
        return [p for p in await asyncio.gather(*(one(i) for i in self.procs)) if p]


def first_control_app(feed: "ActivityFeed") -> web.Application:
    """What the ingest workers ask the first one, on its private socket:
    whether the debugger is watched, and the records of what they did."""
    async def watching(request: web.Request) -> web.Response:
        return web.Response(text="1" if feed.watched else "0")

    async def activity(request: web.Request) -> web.Response:
        for record in _records_decoder.decode(await request.read()):
            for w in feed.watchers:
                w.offer(record)
        return web.Response(text="ok")

    control = web.Application(client_max_size=64 << 20)
    control.router.add_get("/watching", watching)
    control.router.add_post("/activity", activity)
    return control


_records_decoder = msgspec.json.Decoder(list[dict[str, Any]])


async def relay_activity(feed: "ActivityFeed", runtime: Runtime) -> None:
    """An ingest worker's part of the debugger: while the first worker has a
    watcher, this worker's records go to it (a bounded buffer here too: what
    a slow first worker cannot take gives way to newer records)."""
    from gateway.activity import Watcher

    relay: Watcher | None = None
    encode = msgspec.json.Encoder().encode
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=runtime.first_control),
                                     timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT)) as session:
        while True:
            try:
                async with session.get("http://first/watching") as r:
                    watched = (await r.text()) == "1"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                watched = False
            if watched and relay is None:
                relay = feed.watch({})
            elif not watched and relay is not None:
                feed.unwatch(relay)
                relay = None
            if relay is None:
                await asyncio.sleep(RELAY_EVERY)
                continue
            until = asyncio.get_running_loop().time() + RELAY_EVERY
            while (left := until - asyncio.get_running_loop().time()) > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(relay.ready.wait(), left)
                records = relay.take(1000)
                if records:
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                        async with session.post("http://first/activity", data=encode(records)) as r:
                            await r.read()


class PassToFirst:
    """The handler of FIRST_WORKER_PATHS on an ingest worker: the request
    goes to the first worker, and its answer (a stream too) comes back."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.runtime.first),
                                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                                                 auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        body = await request.read() if request.can_read_body else None
        try:
            async with self.session.request(request.method, f"http://first{request.path_qs}", headers=headers,
                                            data=body, allow_redirects=False) as up:
                resp = web.StreamResponse(status=up.status, headers={
                    k: v for k, v in up.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection")})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except (aiohttp.ClientError, OSError) as e:
            return web.json_response(error_body("overload", f"the first worker does not answer: {e}"),
                                     status=503)

    async def close(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()


def control_app(counters: Counters, spool: "Spool", max_event_bytes: int) -> web.Application:
    """What the first worker asks an ingest worker, on its private socket."""
    async def get_counters(request: web.Request) -> web.Response:
        return web.Response(body=counters_doc(counters), content_type="application/msgpack")

    async def ready(request: web.Request) -> web.Response:
        # within the first worker's wait for this answer
        problems = await spool_problems(spool, max_event_bytes, ASK_TIMEOUT / 2)
        return web.Response(status=503 if problems else 200, text="; ".join(problems) or "ready")

    control = web.Application()
    control.router.add_get("/counters", get_counters)
    control.router.add_get("/ready", ready)
    return control
