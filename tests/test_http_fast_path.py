"""The ingest endpoints' own HTTP path (gateway/http_fast_path.py,
docs/http-fast-path.md), on real sockets, against aiohttp's answers.

Two gateways of the same config run side by side: one served as
``gateway serve`` serves (the fast path first), one by aiohttp alone.  The
same bytes go to both over raw connections, and what comes back (status
line, header fields but Date, body) and what is stored must be the same,
whether the fast path answered the request or handed the connection to
aiohttp.  The counters of the fast path say which of the two it did.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import random
import socket
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pytest

from gateway import config as config_mod
from gateway import http_fast_path
from gateway.app import create_app
from gateway.testing import WRITE_KEY, gateway_config, spool_calls, wait_until

AUTH = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
LIMITS = {"max_event_bytes": "1KiB", "max_batch_bytes": "4KiB"}
KEEP = {"retention": 3600}  # no destination: keep what is stored for the test to read


class Reply(NamedTuple):
    status_line: bytes
    fields: list[tuple[bytes, bytes]]  # but Date
    body: bytes


def request(path: str = "/v1/track", body: bytes | None = None, *, method: str = "POST",
            version: str = "HTTP/1.1", auth: bool = True, fields: list[tuple[str, str]] | None = None,
            length: bool = True) -> bytes:
    """One request's bytes, as an SDK writes them unless told otherwise."""
    body = msgspec.json.encode({"userId": "u1", "event": "Clicked"}) if body is None else body
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1", "Content-Type: application/json"]
    if auth:
        lines.append(f"Authorization: {AUTH}")
    lines += [f"{k}: {v}" for k, v in fields or []]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def call(event: str, **fields: Any) -> bytes:
    return msgspec.json.encode({"userId": "u1", "event": event, **fields})


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    if lines[0].startswith(b"HTTP/1.1 100"):  # Expect: 100-continue, then the answer
        return await read_reply(reader)
    fields = [tuple(part.strip() for part in line.split(b":", 1)) for line in lines[1:]]
    length = next((int(v) for k, v in fields if k.lower() == b"content-length"), None)
    if lines[0].split(b" ")[1] in (b"204", b"304"):
        length = 0
    body = await reader.readexactly(length) if length is not None else await reader.read()
    return Reply(lines[0], [f for f in fields if f[0].lower() != b"date"], body)  # type: ignore[misc]


async def exchange(port: int, *pieces: bytes, answers: int = 1, pause: float = 0.0) -> list[Reply]:
    """Write ``pieces`` on one new connection (``pause`` seconds apart), read ``answers`` replies."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        return [await asyncio.wait_for(read_reply(reader), 10) for _ in range(answers)]
    finally:
        writer.close()


class Pair(NamedTuple):
    fast: Any  # the test client of the gateway served with the fast path
    plain: Any  # the test client of the same gateway served by aiohttp alone
    fast_dir: Path
    plain_dir: Path

    @property
    def counts(self) -> tuple[int, int]:
        fp = self.fast.server.runner.server.fast
        return fp.served, fp.handed_off

    async def both(self, *pieces: bytes, answers: int = 1) -> list[Reply]:
        """Send to both; their replies must be the same; returns them."""
        fast = await exchange(self.fast.port, *pieces, answers=answers)
        plain = await exchange(self.plain.port, *pieces, answers=answers)
        assert fast == plain
        return fast

    def stored(self) -> list[dict[str, Any]]:
        """What both stored, which must be the same (but the ids and times the gateway made)."""
        def strip(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
            made = {"messageId", "receivedAt", "timestamp", "originalTimestamp", "sentAt"}
            return [{k: v for k, v in c.items() if k not in made} for c in calls]
        fast, plain = strip(spool_calls(self.fast_dir)), strip(spool_calls(self.plain_dir))
        assert fast == plain
        return fast


@pytest.fixture
async def pair(gateway_client: Any, aiohttp_client: Any, tmp_path: Path) -> Pair:
    fast = await gateway_client(server=LIMITS, storage=KEEP)
    plain_dir = tmp_path / "plain"
    plain = await aiohttp_client(create_app(config_mod.loads(gateway_config(plain_dir, server=LIMITS,
                                                                            storage=KEEP))))
    return Pair(fast, plain, tmp_path, plain_dir)


STRICT = [("X-Strict-Mode", "1")]
#: requests the fast path answers itself, with aiohttp's answer
ANSWERED = {
    "a track": request(),
    "a batch": request("/v1/batch", msgspec.json.encode({"batch": [{"type": "track", "userId": "u1",
                                                                     "event": "A"}]})),
    "lax, a call missing its event": request(body=b'{"userId": "u1"}'),
    "strict, a call missing its event": request(body=b'{"userId": "u1"}', fields=STRICT),
    "strict, a batch with one bad call": request("/v1/batch", b'{"batch": [{"type": "track", "userId": "u1", '
                                                 b'"event": "B"}, {"type": "track"}]}', fields=STRICT),
    "strict, no write key": request(auth=False, fields=STRICT),
    "lax, a wrong write key": request(auth=False, fields=[("Authorization", "Bearer nope")]),
    "the write key in the body": request(body=msgspec.json.encode({"writeKey": WRITE_KEY, "userId": "u2",
                                                                  "event": "C"}), auth=False),
    "strict, not JSON": request(body=b"{nope", fields=STRICT),
    "strict, an empty body": request(body=b"", fields=STRICT),
    "strict, a batch call over max_event_bytes": request(
        "/v1/batch", msgspec.json.encode({"batch": [{"type": "track", "userId": "u1", "event": "D",
                                                     "properties": {"pad": "x" * 1100}}]}), fields=STRICT),
    "keep-alive said": request(fields=[("Connection", "keep-alive")]),
    "an identify": request("/v1/identify", b'{"userId": "u3", "traits": {"plan": "pro"}}'),
}


@pytest.mark.parametrize("name", list(ANSWERED))
async def test_answered_on_the_fast_path_as_aiohttp_answers(pair: Pair, name: str) -> None:
    replies = await pair.both(ANSWERED[name])
    assert pair.counts == (1, 0), "the fast path answered it"
    assert replies[0].status_line.split(b" ")[1] in (b"200", b"400", b"401")
    pair.stored()


GZIPPED = gzip.compress(call("Zipped"))
#: requests the fast path hands to aiohttp, before reading any of them
HANDED_OFF = {
    "chunked": request(length=False, body=b"", fields=[("Transfer-Encoding", "chunked")]) +
    b"%x\r\n%s\r\n0\r\n\r\n" % (len(call("Chunked")), call("Chunked")),
    "gzip": request(body=GZIPPED, fields=[("Content-Encoding", "gzip")]),
    "Content-Encoding: identity": request(fields=[("Content-Encoding", "identity")]),
    "a browser (Origin)": request(fields=[("Origin", "https://shop.example")]),
    "HTTP/1.0": request(version="HTTP/1.0"),
    "a query string": request("/v1/track?x=1"),
    "Connection: close": request(fields=[("Connection", "close")]),
    "Expect: 100-continue": request(fields=[("Expect", "100-continue")]),
    "strict, over max_batch_bytes": request("/v1/batch", b"{" + b" " * 5000 + b"}", fields=STRICT),
    "an unknown path": request("/v1/nope"),
    "GET /health": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "a settings request": f"GET /v1/projects/{WRITE_KEY}/settings HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "an OPTIONS preflight": b"OPTIONS /v1/track HTTP/1.1\r\nHost: x\r\nOrigin: https://a.example\r\n"
                            b"Access-Control-Request-Method: POST\r\n\r\n",
    "a lowercase method": request(method="post"),
    "a header value with obs-text": request(fields=[("X-Name", "caf\xe9")]),
}
#: requests a careless parser would read otherwise than aiohttp does (request
#: smuggling, RFC 9112 section 11.2): aiohttp must be the one that judges them
SMUGGLED = {
    "Content-Length and Transfer-Encoding": request(fields=[("Transfer-Encoding", "chunked")]),
    "two different Content-Lengths": request().replace(b"Content-Length:", b"Content-Length: 3\r\nContent-Length:"),
    "two equal Content-Lengths": request().replace(b"\r\n\r\n", b"\r\nContent-Length: %d\r\n\r\n"
                                                   % len(call("Clicked"))),
    "a signed Content-Length": request().replace(b"Content-Length: ", b"Content-Length: +"),
    "a space before the colon": request().replace(b"Content-Length:", b"Content-Length :"),
    "an obs-fold line": request(fields=[("X-Folded", "a\r\n  b")]),
    "bare LF line ends": request().replace(b"\r\n", b"\n"),
    "a NUL in a field": request(fields=[("X-Name", "a\x00b")]),
    "a field without a colon": request(fields=[("X-Name", "x")]).replace(b"X-Name: x", b"X-Name x"),
    "no Host": request().replace(b"Host: 127.0.0.1\r\n", b""),
    "two Hosts": request().replace(b"Host: 127.0.0.1\r\n", b"Host: a\r\nHost: b\r\n"),
}


@pytest.mark.parametrize("name", list(HANDED_OFF) + list(SMUGGLED))
async def test_handed_to_aiohttp_with_every_byte(pair: Pair, name: str) -> None:
    data = HANDED_OFF.get(name) or SMUGGLED[name]
    await pair.both(data)
    assert pair.counts == (0, 1), "aiohttp answered it"
    pair.stored()


async def replies_until_closed(port: int, data: bytes) -> list[Reply | str]:
    """Every reply to ``data`` until the server closes (or stops answering for a second)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out: list[Reply | str] = []
    try:
        while True:
            out.append(await asyncio.wait_for(read_reply(reader), 1.0))
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionResetError) as e:
        out.append(type(e).__name__)
    finally:
        writer.close()
    return out


async def test_mutated_heads_are_answered_as_aiohttp_answers_them(pair: Pair) -> None:
    """A differential fuzz (seeded, 200 cases): SDK requests with one to three
    bytes of the head before Content-Length replaced, inserted or deleted (CR,
    LF, NUL, DEL, obs-text, separators...), then a request aiohttp answers and
    closes on; the replies must be those of aiohttp alone.  It found that
    aiohttp refuses a request without Host."""
    rnd = random.Random(20261204)
    base = [request(body=call("F")),
            request("/v1/batch", b'{"batch": [{"type": "track", "userId": "u", "event": "x"}]}', fields=STRICT),
            request(fields=[("X-Forwarded-For", "10.1.2.3"), ("Connection", "keep-alive")])]
    alphabet = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b"\x80", b"\x7f", b"a", b"A", b"0", b"-", b";"]
    then = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for _ in range(200):
        data = bytearray(rnd.choice(base))
        before = data.find(b"Content-Length:") - 1  # the length and body stay as sent: the framing is not fuzzed
        for _ in range(rnd.randint(1, 3)):
            at = rnd.randrange(0, before)
            op = rnd.random()
            if op < 0.4:
                data[at:at + 1] = rnd.choice(alphabet)
            elif op < 0.7:
                data[at:at] = rnd.choice(alphabet)
            else:
                del data[at]
        fast = await replies_until_closed(pair.fast.port, bytes(data) + then)
        plain = await replies_until_closed(pair.plain.port, bytes(data) + then)
        assert fast == plain, bytes(data)
    served, handed_off = pair.counts
    assert served > 20 and handed_off >= 200, "both paths were tried"
    pair.stored()


async def test_a_connection_is_handed_off_at_the_first_request_it_does_not_read(pair: Pair) -> None:
    """Requests in one write (pipelined): the fast path answers the first
    three in order, aiohttp the rest, the last of them one the fast path
    would have read (the connection stays with aiohttp)."""
    data = (request(body=call("1")) + request("/v1/batch", b'{"batch": [{"type": "track", "userId": "u1", '
                                                          b'"event": "2"}]}') + request(body=call("3")) +
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + request(body=call("4")))
    replies = await pair.both(data, answers=5)
    assert [r.status_line for r in replies] == [b"HTTP/1.1 200 OK"] * 5
    assert replies[3].body == b'{"status":"ok"}'
    assert pair.counts == (3, 1)
    assert [c["event"] for c in pair.stored()] == ["1", "2", "3", "4"]


async def test_a_request_in_small_pieces(pair: Pair) -> None:
    data = request("/v1/batch", msgspec.json.encode({"batch": [{"type": "track", "userId": "u1", "event": "E",
                                                                "properties": {"n": i}} for i in range(20)]}))
    pieces = [data[i:i + 97] for i in range(0, len(data), 97)]
    replies = await exchange(pair.fast.port, *pieces, pause=0.002)
    assert replies[0].status_line == b"HTTP/1.1 200 OK"
    assert pair.counts == (1, 0)
    assert [c["properties"]["n"] for c in spool_calls(pair.fast_dir)] == list(range(20))


async def test_many_pipelined_requests_past_the_buffer_limit(pair: Pair) -> None:
    """More than the connection buffers: reading pauses, then every request
    is answered, in order."""
    pair.fast.server.runner.server.fast.buffer_limit = 2000
    data = b"".join(request(body=call(str(i))) for i in range(60))
    replies = await exchange(pair.fast.port, data, answers=60)
    assert [r.status_line for r in replies] == [b"HTTP/1.1 200 OK"] * 60
    assert [c["event"] for c in spool_calls(pair.fast_dir)] == [str(i) for i in range(60)]
    assert pair.counts == (60, 0)


async def test_a_client_gone_before_its_body_stores_nothing(pair: Pair) -> None:
    data = request(body=call("Half"))
    reader, writer = await asyncio.open_connection("127.0.0.1", pair.fast.port)
    writer.write(data[:-5])
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.3)
    replies = await exchange(pair.fast.port, request(body=call("Whole")))
    assert replies[0].status_line == b"HTTP/1.1 200 OK"
    assert [c["event"] for c in spool_calls(pair.fast_dir)] == ["Whole"]


async def test_an_idle_connection_is_closed_after_the_keepalive_timeout(
        pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_fast_path, "KEEPALIVE_TIMEOUT", 0.3)
    monkeypatch.setattr(http_fast_path, "SWEEP_EVERY", 0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", pair.fast.port)
    try:
        writer.write(request())
        assert (await asyncio.wait_for(read_reply(reader), 10)).status_line == b"HTTP/1.1 200 OK"
        assert await asyncio.wait_for(reader.read(), 5) == b"", "closed by the server"
    finally:
        writer.close()


async def test_shutdown_closes_idle_connections_and_answers_the_busy_one(pair: Pair) -> None:
    """The server stops (as on SIGTERM): an idle connection is closed; a
    request being stored is answered 200, then its connection closed."""
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", pair.fast.port)
    idle_w.write(request(body=call("Before")))
    assert (await read_reply(idle_r)).status_line == b"HTTP/1.1 200 OK"
    busy_r, busy_w = await asyncio.open_connection("127.0.0.1", pair.fast.port)
    busy_w.write(request(body=call("During")))
    await busy_w.drain()
    fast = pair.fast.server.runner.server.fast
    await wait_until(lambda: fast.served == 2, what="the second request being answered", poll=0.001)
    closing = asyncio.create_task(pair.fast.server.close())
    try:
        assert (await asyncio.wait_for(read_reply(busy_r), 10)).status_line == b"HTTP/1.1 200 OK"
        assert await asyncio.wait_for(idle_r.read(), 10) == b""
        await asyncio.wait_for(closing, 20)
    finally:
        idle_w.close()
        busy_w.close()
    assert [c["event"] for c in spool_calls(pair.fast_dir)] == ["Before", "During"]


async def test_a_client_that_half_closes_after_its_request_gets_its_answer(pair: Pair) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", pair.fast.port)
    try:
        writer.write(request(body=call("Then EOF")))
        writer.write_eof()
        assert (await asyncio.wait_for(read_reply(reader), 10)).status_line == b"HTTP/1.1 200 OK"
        assert await asyncio.wait_for(reader.read(), 5) == b"", "closed once answered"
    finally:
        writer.close()
    assert [c["event"] for c in spool_calls(pair.fast_dir)] == ["Then EOF"]


async def test_with_server_access_log_aiohttp_answers_and_logs_every_request(gateway_process: Any) -> None:
    """``server.access_log: true``: aiohttp writes the access log, so the
    fast path stands aside and every request has its line."""
    gw = await gateway_process(server={"access_log": True})
    replies = await exchange(gw.port, request(body=call("A")) + request(body=call("B")), answers=2)
    assert [r.status_line for r in replies] == [b"HTTP/1.1 200 OK"] * 2
    await wait_until(lambda: gw.log_tail(20000).count('"POST /v1/track HTTP/1.1" 200') == 2,
                     what="an access log line for each request", seen=lambda: gw.log_tail())


async def test_a_client_that_does_not_read_its_answers_is_not_answered_further(pair: Pair) -> None:
    """Write back-pressure: 20,000 pipelined requests (lax, refused: nothing
    is stored) from a client that reads nothing for a second, with small
    socket buffers on both sides.  The fast path stops taking requests once
    its answers pile up (pause_writing) instead of holding them all in
    memory; once the client reads, every request is answered, in order."""
    n = 20_000
    one = request(auth=False, body=b"{}")
    fast = pair.fast.server.runner.server.fast
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", pair.fast.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        await wait_until(lambda: fast.connections, what="the server's side of the connection")
        (conn,) = fast.connections
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer.write(one * n)
        sending = asyncio.ensure_future(writer.drain())
        await asyncio.sleep(1.0)
        held, buffered = fast.served, conn.transport.get_write_buffer_size()
        assert held < n and buffered < 256 * 1024, \
            f"{held} requests answered, {buffered} bytes of answers held, while the client read nothing"
        replies = [await asyncio.wait_for(read_reply(reader), 10) for _ in range(n)]
        await asyncio.wait_for(sending, 10)
    finally:
        writer.close()
    assert {r.status_line for r in replies} == {b"HTTP/1.1 200 OK"}
    assert fast.served == n and fast.handed_off == 0
