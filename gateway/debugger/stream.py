"""``GET /debugger/events``: the activity feed as a ``text/event-stream``.

One watcher per connection, with the filters of its query string.  The
watcher's buffer is bounded (gateway/activity.py); this side writes it out in
pieces of about ``WRITE_BYTES``, each under ``WRITE_TIMEOUT``: a reader whose
socket does not drain loses its connection (the browser's EventSource comes
back by itself) rather than holding memory, and what gave way meanwhile is
said in an ``overflow`` record.  Nothing here ever waits on the loop's
behalf: every wait is this connection's own coroutine.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Iterable

import msgspec
from aiohttp import web

from gateway.activity import FILTER_KEYS, ActivityFeed, Watcher

#: seconds between comment lines on a quiet stream (proxies close idle connections)
HEARTBEAT = 15.0
#: seconds between looks at whether the reader went away while nothing happens
LIVENESS = 1.0
#: seconds one write may wait for the reader's socket to drain; then the watcher goes
WRITE_TIMEOUT = 10.0
#: records taken from the watcher's buffer at a time
TAKE = 200
#: bytes written at once, about (records are never split)
WRITE_BYTES = 64 * 1024
#: milliseconds the browser waits before it reconnects
RECONNECT_MS = 2000
#: secrets shorter than this are not looked for (they would redact ordinary text)
MIN_SECRET = 4
REDACTED = b"[redacted]"

_encode = msgspec.json.Encoder().encode

STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
    "X-Content-Type-Options": "nosniff",
}


class Redactor:
    """Cuts the write keys and the admin password out of what is sent, as
    written and as JSON escapes them: a call may carry a key anywhere."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[bytes] = set()
        for s in secrets:
            if len(s) >= MIN_SECRET:
                forms.add(s.encode())
                forms.add(_encode(s)[1:-1])
        self.forms = sorted(forms, key=len, reverse=True)

    def __call__(self, data: bytes) -> bytes:
        for form in self.forms:
            if form in data:
                data = data.replace(form, REDACTED)
        return data


def event(record: dict[str, Any]) -> bytes:
    """One server-sent event: the record as one line of JSON."""
    return b"data: " + _encode(record) + b"\n\n"


def filters_of(request: web.Request) -> dict[str, str]:
    return {k: request.query.get(k, "").strip() for k in FILTER_KEYS}


class SlowReader(Exception):
    """The reader's socket did not drain within WRITE_TIMEOUT."""


async def stream(request: web.Request, feed: ActivityFeed, redact: Redactor, hello: dict[str, Any],
                 stopping: asyncio.Event) -> web.StreamResponse:
    """Serve one watcher until its reader goes away or stops reading, or the
    server stops (``stopping``: a stream never holds up a shutdown)."""
    resp = web.StreamResponse(headers=STREAM_HEADERS)
    await resp.prepare(request)
    watcher = feed.watch(filters_of(request))
    try:
        first = {"kind": "hello", "at": time.time(), **hello, "filters": watcher.filters,
                 "buffer": watcher.buffer.maxlen}
        await _write(request, resp, b"retry: %d\n" % RECONNECT_MS + redact(event(first)))
        await _serve(request, resp, watcher, redact, stopping)
    except (SlowReader, ConnectionResetError):
        pass
    finally:
        feed.unwatch(watcher)
    return resp


async def _serve(request: web.Request, resp: web.StreamResponse, watcher: Watcher, redact: Redactor,
                 stopping: asyncio.Event) -> None:
    reported = 0  # drops already said
    quiet_since = time.monotonic()
    while not stopping.is_set():
        if not watcher.buffer:
            try:
                async with asyncio.timeout(LIVENESS):
                    await watcher.ready.wait()
            except TimeoutError:
                transport = request.transport
                if transport is None or transport.is_closing():
                    return
                if time.monotonic() - quiet_since >= HEARTBEAT:
                    await _write(request, resp, b": heartbeat\n\n")
                    quiet_since = time.monotonic()
                continue
            if stopping.is_set():
                return
        out = bytearray()
        if watcher.dropped > reported:
            # The records that gave way were older than those still buffered.
            out += event({"kind": "overflow", "at": time.time(), "dropped": watcher.dropped - reported,
                          "dropped_total": watcher.dropped})
            reported = watcher.dropped
        for record in watcher.take(TAKE):
            out += event(record)
            if len(out) >= WRITE_BYTES:
                await _write(request, resp, redact(bytes(out)))
                out.clear()
        if out:
            await _write(request, resp, redact(bytes(out)))
        quiet_since = time.monotonic()


async def _write(request: web.Request, resp: web.StreamResponse, data: bytes) -> None:
    """Write, waiting for the reader at most WRITE_TIMEOUT; past that the
    connection is aborted, and what it had buffered freed with it."""
    try:
        async with asyncio.timeout(WRITE_TIMEOUT):
            await resp.write(data)
    except TimeoutError:
        transport = request.transport
        if transport is not None:
            transport.abort()
        raise SlowReader() from None
