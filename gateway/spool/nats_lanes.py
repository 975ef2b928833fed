"""What one gateway process holds of one destination's consumers: the pull
requests kept outstanding on each (``Puller``), the calls leased from the
calls stream in the order they came (``CallLane``) and the retries leased
from the retries stream (``RetryLane``).

Leased means delivered to this process and not acknowledged: JetStream gives
a message to no other process until its ack wait runs out, and this process
reports progress on what it holds longer than a third of that (the
destination on hold, a long send), so only a process that died loses its
leases, and only to another process, after the ack wait.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable
from urllib.parse import unquote

import msgspec

from gateway.spool.nats_js import SPAN, nanos, parse_reply
from gateway.spool.records import Pending, Record

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

log = logging.getLogger("gateway.spool.nats")

PULL_EXPIRES = 5.0  # seconds a waiting pull request lasts on the server
PULL_HEARTBEAT = 1.0  # seconds between the server's heartbeats on a waiting pull request
PULL_BATCH = 1000  # messages one pull request asks for at most
POLL_TIMEOUT = 1.0  # seconds a look at what the consumer has now may take
#: seconds before a retry is due that it is kept rather than sent back with a delay
RETRY_EARLY = 0.05

pending_decoder = msgspec.msgpack.Decoder(Pending)


class _Request:
    __slots__ = ("rid", "left", "done", "missing", "deadline")

    def __init__(self, rid: str, batch: int, done: asyncio.Future[None], deadline: float) -> None:
        self.rid = rid
        self.left = batch
        self.done = done
        self.missing = False
        self.deadline = deadline


class Puller:
    """Keeps one pull request outstanding on a durable consumer while
    ``room()`` says there is room, and hands every message to ``on_msg``.

    Each request has a reply subject of its own, so that the messages and
    the status of each (408 expired, 409 leadership change or consumer
    deleted, 404 nothing there, 503 no consumer) are told apart; a request
    lost with a connection is given up after its expiry and asked again.
    When no consumer answers, ``on_missing`` looks into it (an election goes
    by; a consumer deleted is made again), from this task only: the
    delivery worker never waits for that."""

    def __init__(self, stream: str, consumer: str, room: Callable[[], tuple[int, int]],
                 on_msg: Callable[["Msg"], None], on_missing: Callable[[], Awaitable[None]]) -> None:
        self.stream = stream
        self.consumer = consumer
        self.room = room
        self.on_msg = on_msg
        self.on_missing = on_missing
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.requests: dict[str, _Request] = {}
        self.wake = asyncio.Event()  # room was made, or the connection came back
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._sub: Any = None
        self.nc: "Client | None" = None
        self.inbox = ""
        self.closed = False
        self.trouble = False  # a poll found no consumer answering

    async def start(self, nc: "Client") -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self._plen = len(self.inbox) + 1
        self._sub = await nc.subscribe(self.inbox + ".*", cb=self._on)
        self._task = asyncio.create_task(self._run(), name=f"pull:{self.consumer}")

    async def stop(self) -> None:
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        for req in self.requests.values():
            if not req.done.done():
                req.done.set_result(None)
        self.requests.clear()
        sub, self._sub = self._sub, None
        if sub is None:
            return
        try:
            if self.nc is not None and self.nc.is_connected:
                # Messages the server handed to a waiting request before it
                # saw the unsubscribe still arrive, and must reach on_msg so
                # that the close hands them back: dropped here, they would
                # wait out their ack wait before anyone else could have them.
                await asyncio.wait_for(sub.drain(), POLL_TIMEOUT)
            else:
                await sub.unsubscribe()
        except Exception:  # noqa: BLE001 - the connection is closing anyway
            pass

    def reset(self) -> None:
        """The connection came back: what was waiting on the server is gone."""
        for req in list(self.requests.values()):
            self._finish(req)
        self.wake.set()

    async def _run(self) -> None:
        backoff = 0.1
        while not self.closed:
            try:
                batch, max_bytes = self.room()
                if batch <= 0:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), PULL_EXPIRES)
                    except asyncio.TimeoutError:
                        pass
                    continue
                req = await self._request(batch, max_bytes, no_wait=False)
                try:
                    await asyncio.wait_for(asyncio.shield(req.done), PULL_EXPIRES + 2 * PULL_HEARTBEAT)
                except asyncio.TimeoutError:
                    self._finish(req)  # lost (a connection that went away): ask again
                if req.missing or self.trouble:
                    self.trouble = False
                    await self.on_missing()
                    await asyncio.sleep(backoff)
                    backoff = min(2.0, backoff * 2)
                else:
                    backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - disconnected: the reconnect wakes it
                log.debug("%s: pull request failed: %s", self.consumer, e)
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass

    async def poll(self) -> None:
        """Ask for what the consumer has now, and return once it is here:
        every message the server had for this process before its answer
        arrives before the answer, on the one connection."""
        batch, max_bytes = self.room()
        if batch <= 0 or self.nc is None or not self.nc.is_connected:
            return
        try:
            req = await self._request(batch, max_bytes, no_wait=True)
        except Exception as e:  # noqa: BLE001 - the connection went: what is held is what there is
            log.debug("%s: poll failed: %s", self.consumer, e)
            return
        try:
            await asyncio.wait_for(asyncio.shield(req.done), POLL_TIMEOUT)
        except asyncio.TimeoutError:
            self._finish(req)
        if req.missing:  # the pulling task looks into it; the caller goes on with what is held
            self.trouble = True
            self.wake.set()

    async def _request(self, batch: int, max_bytes: int, no_wait: bool) -> _Request:
        assert self.nc is not None
        rid = str(next(self._ids))
        req = _Request(rid, batch, asyncio.get_running_loop().create_future(), time.monotonic() + PULL_EXPIRES)
        self.requests[rid] = req
        body: dict[str, Any] = {"batch": batch, "max_bytes": max_bytes}
        if no_wait:
            body["no_wait"] = True
        else:
            body.update(expires=nanos(PULL_EXPIRES), idle_heartbeat=nanos(PULL_HEARTBEAT))
        try:
            await self.nc.publish(self.next_subject, json.dumps(body).encode(), reply=f"{self.inbox}.{rid}")
        except BaseException:
            self._finish(req)
            raise
        return req

    def _finish(self, req: _Request) -> None:
        self.requests.pop(req.rid, None)
        if not req.done.done():
            req.done.set_result(None)

    async def _on(self, msg: "Msg") -> None:
        req = self.requests.get(msg.subject[self._plen:])
        if msg.reply:  # a message of the stream; its reply subject acknowledges it
            try:
                self.on_msg(msg)
            except Exception:  # noqa: BLE001 - one bad message must not stop the lane
                log.exception("%s: could not take a message", self.consumer)
            if req is not None:
                req.left -= 1
                if req.left <= 0:
                    self._finish(req)
            return
        status = msg.headers.get("Status") if msg.headers else None
        if status == "100" or req is None:
            return  # a heartbeat: the request still waits
        if status == "503" or (status == "409" and "Deleted" in str(msg.headers)):
            req.missing = True  # no consumer answered: an election, or it is gone
        self._finish(req)


class Leased(msgspec.Struct):
    """A message of the calls stream this process holds: its calls, and how
    many of them are covered by acks already (``start``)."""

    sseq: int
    reply: str
    source: str
    received: float
    calls: list[bytes]
    size: int
    touched: float
    order: int
    start: int = 0


class CallLane:
    """The calls of one destination leased by this process, in the order the
    consumer delivered them.

    ``window`` hands out runs in increasing position (a redelivered message
    older than the ones before it starts a window of its own), so the
    worker's comparisons of positions hold within a window; ``cover`` takes
    an ack's cursor: every leased call from the first one not covered up to
    the cursor, in that order, is done, and messages done whole are
    acknowledged."""

    def __init__(self, max_messages: int, max_calls: int, max_bytes: int) -> None:
        self.buf: deque[Leased] = deque()
        self.by_sseq: dict[int, Leased] = {}
        self.calls = 0  # calls held, not yet covered
        self.size = 0  # their bytes
        self.cursor = 0  # the newest cursor an ack covered
        self.max_messages, self.max_calls, self.max_bytes = max_messages, max_calls, max_bytes
        self._order = itertools.count()
        self._sources: dict[str, str] = {}

    def room(self) -> tuple[int, int]:
        """(messages, bytes) a pull request may ask for now."""
        if self.calls >= self.max_calls or self.size >= self.max_bytes:
            return 0, 0
        return min(PULL_BATCH, self.max_messages - len(self.buf)), max(2 << 20, self.max_bytes - self.size)

    def add(self, msg: "Msg", now: float) -> bool:
        """Take a delivered message; False when it was one held already
        (delivered again after its ack wait): that one is kept, with the new
        reply subject."""
        sseq, _ = parse_reply(msg.reply)
        held = self.by_sseq.get(sseq)
        if held is not None:
            held.reply, held.touched = msg.reply, now
            return False
        hdrs = msg.headers or {}
        raw = hdrs.get("Gw-Source", "")
        source = self._sources.get(raw)
        if source is None:
            source = self._sources[raw] = unquote(raw)
        try:
            received = float(hdrs.get("Gw-Received") or now)
        except ValueError:
            received = now
        data = msg.data
        e = Leased(sseq, msg.reply, source, received, data.split(b"\n"), len(data), now, next(self._order))
        self.buf.append(e)
        self.by_sseq[sseq] = e
        self.calls += len(e.calls)
        self.size += e.size
        return True

    def window(self, after: int, limit: int, max_bytes: int) -> list[Record]:
        """The calls after ``after``: right after it when it is a leased call
        not yet covered (a read-ahead), else from the first one not covered."""
        buf = self.buf
        if not buf:
            return []
        e = self.by_sseq.get(after // SPAN) if after > 0 else None
        idx = after % SPAN
        if e is not None and idx + 1 >= e.start and idx < len(e.calls):
            i, j = e.order - buf[0].order, idx + 1
        else:
            i, j = 0, buf[0].start
        out: list[Record] = []
        size, prev = 0, -1
        for e in itertools.islice(buf, i, None):
            base = e.sseq * SPAN
            if base <= prev:
                break  # delivered again, older than what came before: the next window
            calls, source, received = e.calls, e.source, e.received
            for k in range(j, len(calls)):
                out.append(Record(base + k, source, received, calls[k]))
                size += len(calls[k])
                if len(out) >= limit or size >= max_bytes:
                    return out
            if j < len(calls):
                prev = base + len(calls) - 1
            j = 0
        return out

    def cover(self, cursor: int) -> list[str]:
        """Mark every leased call up to ``cursor`` done (see the class);
        returns the reply subjects of the messages now done whole."""
        self.cursor = max(self.cursor, cursor)
        buf = self.buf
        done: list[str] = []
        prev = -1
        while buf:
            e = buf[0]
            base = e.sseq * SPAN
            first, last = base + e.start, base + len(e.calls) - 1
            if first <= prev or first > cursor:
                break
            if last <= cursor:
                buf.popleft()
                self.by_sseq.pop(e.sseq, None)
                self.calls -= len(e.calls) - e.start
                self.size -= e.size
                done.append(e.reply)
                prev = last
                continue
            n = cursor - base + 1 - e.start
            e.start += n
            self.calls -= n
            break
        return done

    def release(self) -> list[str]:
        """Let go of everything held (closing): the reply subjects to nak."""
        replies = [e.reply for e in self.buf]
        self.buf.clear()
        self.by_sseq.clear()
        self.calls = self.size = 0
        return replies

    def stale(self, now: float, age: float) -> Iterable[Leased]:
        """Messages held longer than ``age`` since their last progress report."""
        return [e for e in self.buf if now - e.touched > age]


class RetryLease(msgspec.Struct):
    sseq: int
    reply: str
    pending: Pending
    touched: float


class RetryLane:
    """The retries of one destination leased by this process, by the call's
    position (two entries for one call, from a duplicate, are done together)."""

    def __init__(self, max_leased: int) -> None:
        self.leases: dict[int, list[RetryLease]] = {}
        self.count = 0
        self.max_leased = max_leased

    def room(self) -> tuple[int, int]:
        return min(PULL_BATCH, self.max_leased - self.count), 64 << 20

    def add(self, msg: "Msg", now: float) -> float | None:
        """Take a delivered retry; returns the delay to send it back with when
        it is not due yet (it comes again then), else None (held)."""
        sseq, _ = parse_reply(msg.reply)
        p = pending_decoder.decode(msg.data)
        if p.next_at - now > RETRY_EARLY:
            return max(0.001, p.next_at - now - RETRY_EARLY / 2)
        for held in self.leases.get(p.seq, ()):
            if held.sseq == sseq:
                held.reply, held.touched = msg.reply, now
                return None
        self.leases.setdefault(p.seq, []).append(RetryLease(sseq, msg.reply, p, now))
        self.count += 1
        return None

    def due(self, now: float, limit: int, exclude: Iterable[int]) -> list[Pending]:
        skip = set(exclude)
        got = [held[0].pending for seq, held in self.leases.items()
               if seq not in skip and held[0].pending.next_at <= now]
        got.sort(key=lambda p: (p.next_at, p.seq))
        return got[:limit]

    def held(self, seq: int) -> list[int]:
        """The stream sequences of the entries held for a call."""
        return [x.sseq for x in self.leases.get(seq, ())]

    def take(self, seq: int, sseqs: Iterable[int]) -> list[RetryLease]:
        """Let go of these entries of a call (and not of one that came in
        since: the entry that replaces them, maybe)."""
        wanted = set(sseqs)
        held = self.leases.get(seq)
        if not held or not wanted:
            return []
        taken = [x for x in held if x.sseq in wanted]
        left = [x for x in held if x.sseq not in wanted]
        if left:
            self.leases[seq] = left
        else:
            del self.leases[seq]
        self.count -= len(taken)
        return taken

    def origin(self, seq: int) -> int | None:
        """The stream sequence of the retry a call's entry came from, if this process holds one."""
        held = self.leases.get(seq)
        return held[0].sseq if held else None

    def release(self) -> list[RetryLease]:
        held = [x for group in self.leases.values() for x in group]
        self.leases.clear()
        self.count = 0
        return held

    def stale(self, now: float, age: float) -> Iterable[RetryLease]:
        return [x for group in self.leases.values() for x in group if now - x.touched > age]
