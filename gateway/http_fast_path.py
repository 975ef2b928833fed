"""The ingest endpoints' own HTTP/1.1 path, in front of aiohttp's.

Most of a small call's time went to aiohttp's web layer (a Request, a
router, a Response and their headers: about 40 us a request on this
machine, where the gateway's own work is about 15).  An SDK's connection
is a run of plain ``POST /v1/<kind>`` requests with a Content-Length, so a
connection starts here: a request whose head this module recognises in
full (docs/http-fast-path.md says exactly which) is read, answered by the
same ``Handlers.answer_calls`` as through aiohttp, and written back with the
headers aiohttp would send.  At the first request it does not recognise
(any other path or method, chunked or compressed bodies, ``Expect``,
``Origin``, HTTP/1.0, a body over the limit, anything unusual in the head),
the connection is handed to aiohttp with every byte it has received, before
any of that request is consumed, and stays with aiohttp: aiohttp then
answers it exactly as it would have from the start.
"""

from __future__ import annotations

import asyncio
import http
import re
import time
from collections.abc import Mapping
from email.utils import formatdate
from typing import Any, NamedTuple, Protocol

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict, CIMultiDictProxy


class Answer(NamedTuple):
    """An ingest request's answer, whichever HTTP path it came by."""

    status: int
    body: bytes  # JSON
    headers: dict[str, str] | None = None
    source: str | None = None  # for the CORS headers


class IngestEndpoints(Protocol):
    """What answers the ingest endpoints (gateway/app.py's Handlers)."""

    kinds: frozenset[str]

    def body_limit(self, kind: str) -> int: ...

    async def answer_calls(self, kind: str, endpoint: str, body: bytes, headers: Mapping[str, str],
                           peer: str | None) -> Answer: ...


#: the app's IngestEndpoints, which the fast path answers through
ENDPOINTS: web.AppKey[IngestEndpoints] = web.AppKey("ingest_endpoints")

#: a head this path reads: the request line and header fields of printable
#: ASCII, names that are RFC 9110 tokens (nothing llhttp would refuse).  No
#: part can match two ways, so a match takes time linear in the head.
HEAD = re.compile(
    rb"POST (/v1/[a-z]+) HTTP/1\.1\r\n"
    rb"((?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\x20-\x7e\t]*\r\n)*)\r\n")
MAX_HEAD = 8190  # bytes: a longer head is aiohttp's to judge (its max_line_size)
#: fields that send a request to aiohttp: how its body is framed or encoded,
#: a browser's (CORS), and what changes the connection
HANDED_OFF = frozenset({b"transfer-encoding", b"content-encoding", b"expect", b"origin", b"upgrade", b"te",
                        b"trailer"})
KEEPALIVE_TIMEOUT = 75.0  # seconds an idle connection is kept, as aiohttp's default
SWEEP_EVERY = 10.0  # seconds between looks for idle connections
_PHRASES = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_SERVER = SERVER_SOFTWARE.encode()


class FastPath:
    """One per server (every site of a runner): the protocol factory and the connections it made."""

    def __init__(self, handlers: IngestEndpoints, fallback: web.Server) -> None:
        self.handlers = handlers
        self.fallback = fallback
        #: path -> (kind, endpoint, body limit)
        self.paths: dict[bytes, tuple[str, str, int]] = {
            f"/v1/{kind}".encode(): (kind, f"/v1/{kind}", handlers.body_limit(kind)) for kind in handlers.kinds}
        self.buffer_limit = 2 * max(limit for _, _, limit in self.paths.values()) + 65536
        self.connections: set[Connection] = set()
        self.served = 0  # requests answered here
        self.handed_off = 0  # connections handed to aiohttp
        self.closing = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._date_second = -1
        self._date = b""

    def __call__(self) -> asyncio.Protocol:
        return Connection(self)

    def date(self) -> bytes:
        """The Date field's value, made once a second."""
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = formatdate(now, usegmt=True).encode()  # English names whatever the locale
        return self._date

    def added(self, conn: "Connection") -> None:
        self.connections.add(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_EVERY, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle past the keep-alive timeout."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self.connections):
            if conn.task is None and now - conn.last > KEEPALIVE_TIMEOUT:
                conn.close()
        self._sweeper = loop.call_later(SWEEP_EVERY, self._sweep) if self.connections else None

    def pre_shutdown(self) -> None:
        """No new requests: close idle connections, the others once they have answered."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.connections):
            if conn.task is None:
                conn.close()

    async def shutdown(self, timeout: float | None) -> None:
        """Wait (within ``timeout``) for the requests being answered: the spool closes after this."""
        self.pre_shutdown()
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for conn in list(self.connections):
            conn.close()


def response_head(status: int, length: int, date: bytes, headers: dict[str, str] | None) -> bytes:
    """What aiohttp writes for a ``web.Response`` with a JSON body, in its order."""
    extra = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items()) if headers else b""
    return (b"HTTP/1.1 %d %s\r\n%sContent-Type: application/json\r\nContent-Length: %d\r\nDate: %s\r\n"
            b"Server: %s\r\n\r\n" % (status, _PHRASES.get(status, b""), extra, length, date, _SERVER))


class Connection(asyncio.Protocol):
    """One client connection, one request at a time, answered in order."""

    __slots__ = ("fast", "transport", "peer", "chunks", "size", "need", "task", "last", "paused", "done", "eof",
                 "held")

    def __init__(self, fast: FastPath) -> None:
        self.fast = fast
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.need = 0  # bytes the request begun in ``chunks`` needs, once its head was read
        self.task: asyncio.Task[None] | None = None
        self.last = 0.0
        self.paused = False
        self.done = False  # closed, or handed to aiohttp
        self.eof = False  # the client will send no more
        self.held = False  # the client does not read its answers (pause_writing): no next request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, (list, tuple)) else (str(peer) if peer is not None else None)
        self.last = asyncio.get_running_loop().time()
        if self.fast.closing:
            transport.close()
            self.done = True
            return
        self.fast.added(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        # A request being answered goes on: its calls are stored, the answer is lost (the SDK retries).
        self.done = True
        self.chunks = []
        self.fast.connections.discard(self)

    def eof_received(self) -> bool | None:
        """Answer what was asked (whole), then close."""
        self.eof = True
        return True if self.task is not None else None

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.chunks.append(data)
        self.size += len(data)
        self.last = asyncio.get_running_loop().time()
        if self.task is None and not self.held and self.size >= self.need:  # a body still coming is not joined again
            self._next()
        if self.size > self.fast.buffer_limit and not self.paused and not self.done:
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        """The client is not reading its answers: answer no more until it does
        (what it sends meanwhile is held, then not read, past the buffer limit)."""
        self.held = True

    def resume_writing(self) -> None:
        self.held = False
        if self.task is None and not self.done:
            self._go_on()

    def close(self) -> None:
        if self.transport is not None and not self.done:
            self.done = True
            self.transport.close()
        self.fast.connections.discard(self)

    def _next(self) -> None:
        """Start on the next request held, if it is whole; hand the connection
        to aiohttp at one this path does not read."""
        if not self.size:
            return
        chunks = self.chunks
        buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            self.chunks = [buf]
            if self.size > MAX_HEAD or buf.count(b"\n") != buf.count(b"\r\n"):  # too long, or bare LFs
                self._hand_off(buf)
            return
        m = HEAD.match(buf, 0, end + 4)
        route = self.fast.paths.get(m.group(1)) if m is not None else None
        if route is None:
            self._hand_off(buf)
            return
        assert m is not None
        headers = _fields(m.group(2))
        length = _content_length(headers) if headers is not None else None
        if length is None or length > route[2]:
            self._hand_off(buf)
            return
        start = end + 4
        if len(buf) < start + length:
            self.chunks = [buf]
            self.need = start + length
            return
        self.need = 0
        body = buf[start:start + length]
        rest = buf[start + length:]
        self.chunks = [rest] if rest else []
        self.size = len(rest)
        kind, endpoint, _ = route
        self.fast.served += 1
        self.task = asyncio.get_running_loop().create_task(self._answer(kind, endpoint, body, headers))

    async def _answer(self, kind: str, endpoint: str, body: bytes, headers: CIMultiDictProxy[str]) -> None:
        fast = self.fast
        try:
            answer = await fast.handlers.answer_calls(kind, endpoint, body, headers, self.peer)
        finally:
            self.task = None
        transport = self.transport
        if self.done or transport is None:
            return
        out = answer.body
        transport.write(response_head(answer.status, len(out), fast.date(), answer.headers) + out)
        self.last = asyncio.get_running_loop().time()
        if fast.closing or transport.is_closing():
            self.close()
            return
        if not self.held:  # else resume_writing goes on
            self._go_on()

    def _go_on(self) -> None:
        """After an answer: the next request, or the end of the connection."""
        self._next()
        if self.done:  # handed to aiohttp
            return
        transport = self.transport
        assert transport is not None
        if self.eof and self.task is None:
            self.close()  # what is left (if anything) is not a whole request, and no more will come
            return
        if self.paused and self.size <= self.fast.buffer_limit:
            self.paused = False
            transport.resume_reading()

    def _hand_off(self, buf: bytes) -> None:
        """From here on aiohttp has the connection, and what was received."""
        transport = self.transport
        assert transport is not None and self.task is None
        self.done = True
        self.chunks, self.size = [], 0
        self.fast.connections.discard(self)
        self.fast.handed_off += 1
        handler = self.fast.fallback()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.paused:
            self.paused = False
            transport.resume_reading()
        if buf:
            handler.data_received(buf)
        if self.eof:  # as aiohttp does at an end of input: it answers no more
            transport.close()


def _fields(block: bytes) -> CIMultiDictProxy[str] | None:
    """The header fields, or None when one sends the request to aiohttp."""
    pairs: list[tuple[str, str]] = []
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        lower = name.lower()
        if lower in HANDED_OFF:
            return None
        value = value.strip(b" \t")
        if lower == b"connection" and value.lower() != b"keep-alive":
            return None  # close, upgrade, ...: aiohttp's
        pairs.append((name.decode("ascii"), value.decode("ascii")))
    fields = CIMultiDictProxy(CIMultiDict(pairs))
    if len(fields.getall("Host", ())) != 1:
        return None  # aiohttp refuses an HTTP/1.1 request without exactly one Host
    return fields


def _content_length(headers: CIMultiDictProxy[str]) -> int | None:
    """The one Content-Length, all digits; None sends the request to aiohttp."""
    values = headers.getall("Content-Length", ())
    if len(values) != 1 or not values[0].isdigit() or not values[0].isascii():
        return None
    return int(values[0])


class FastServer:
    """aiohttp's ``web.Server`` (the protocol factory every site listens
    with), whose connections start on the fast path; aiohttp's shutdown
    (``pre_shutdown``, then ``shutdown``) closes both kinds."""

    def __init__(self, server: web.Server, handlers: IngestEndpoints) -> None:
        self.server = server
        self.fast = FastPath(handlers, server)

    def __call__(self) -> asyncio.Protocol:
        return Connection(self.fast)

    def pre_shutdown(self) -> None:
        self.fast.pre_shutdown()
        self.server.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:
        await asyncio.gather(self.fast.shutdown(timeout), self.server.shutdown(timeout))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)


class GatewayRunner(web.AppRunner):
    """The AppRunner of ``gateway serve`` (and of the test kit's servers).
    ``fast_path=False`` leaves every request to aiohttp (``server.access_log``:
    aiohttp writes its lines)."""

    def __init__(self, app: web.Application, *, fast_path: bool = True, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._fast_path = fast_path

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if not self._fast_path:
            return server
        return FastServer(server, self.app[ENDPOINTS])  # type: ignore[return-value]
