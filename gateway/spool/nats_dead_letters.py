"""The command line on the NATS backend: ``gateway dlq`` (the dead letters
stream) and ``gateway replay`` (the calls stream, as ``storage.retention``
keeps it), also while gateways run: everything goes through JetStream.

Both are blocking, as the command line and the debugger (on a thread) call
them: each opens a connection with an event loop of its own.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar
from urllib.parse import unquote

import msgspec

from gateway.config import StorageConfig
from gateway.spool.interface import ReplayFilter, ReplayResult
from gateway.spool.nats_js import (
    CONSUMER_NOT_FOUND, SPAN, STREAM_NOT_FOUND, ApiError, Js, Names, connect, nanos, parse_reply,
)
from gateway.spool.records import DeadLetter, Pending, StorageFailed

CONNECT_TIMEOUT = 10.0  # seconds for the command to reach the cluster
IN_FLIGHT = 256  # publishes a command keeps in flight
QUEUE_EVERY = 5000  # calls between progress reports
SCAN_BATCH = 1000  # messages a scan asks for at a time

T = TypeVar("T")
DeadLetters = list[DeadLetter]  # (the class's ``list`` method hides the builtin in its body)
encoder = msgspec.msgpack.Encoder()
dead_decoder = msgspec.msgpack.Decoder(DeadLetter)


class _Command:
    """A connection to the cluster with an event loop of its own."""

    def __init__(self, storage: StorageConfig) -> None:
        assert storage.nats is not None
        self.cfg = storage.nats
        self.names = Names(self.cfg.stream)
        self.loop = asyncio.new_event_loop()
        try:
            self.nc = self.run(connect(self.cfg, purpose="command", timeout=CONNECT_TIMEOUT, forever=False))
        except BaseException:
            self.loop.close()
            raise
        self.js = Js(self.nc)

    def run(self, job: Awaitable[T]) -> T:
        return self.loop.run_until_complete(job)

    def close(self) -> None:
        try:
            self.run(asyncio.wait_for(self.nc.drain(), 6))
        except Exception:  # noqa: BLE001 - closing
            try:
                self.run(self.nc.close())
            except Exception:  # noqa: BLE001
                pass
        self.loop.close()

    def _need(self, stream: str) -> None:
        try:
            self.run(self.js.call(f"STREAM.INFO.{stream}"))
        except ApiError as e:
            if e.err_code != STREAM_NOT_FOUND:
                self.close()
                raise
            self.close()
            raise FileNotFoundError(f"no stream {stream} on {', '.join(self.cfg.servers)}: no gateway with "
                                    f"storage.nats.stream {self.cfg.stream!r} ever started there") from None
        except BaseException:
            self.close()
            raise

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        import nats.errors

        for _ in range(3):
            try:
                msg = await self.nc.request(subject, payload, timeout=5, headers={"Nats-Msg-Id": msg_id})
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                await asyncio.sleep(0.2)
                continue
            resp = json.loads(msg.data)
            if "error" in resp:
                raise StorageFailed(f"the stream refused {subject}: {resp['error'].get('description')}")
            return
        raise StorageFailed(f"the stream did not acknowledge {subject}")

    async def publish_all(self, jobs: list[tuple[str, bytes, str]]) -> None:
        sem = asyncio.Semaphore(IN_FLIGHT)

        async def one(subject: str, payload: bytes, msg_id: str) -> None:
            async with sem:
                await self.publish(subject, payload, msg_id)
        await asyncio.gather(*(one(*j) for j in jobs))


class NatsDeadLetters(_Command):
    """The ``DeadLetterStore`` of the NATS backend: the ``<prefix>_DEAD``
    stream, a subject per destination; a dead letter's id is its sequence
    there.  Replaying one queues it in the retries stream, due now, and
    deletes it."""

    def __init__(self, storage: StorageConfig) -> None:
        super().__init__(storage)
        self._need(self.names.dead)

    def list(self, destination: str | None = None, message_id: str | None = None) -> DeadLetters:
        return self.run(self._list(destination, message_id))

    async def _list(self, destination: str | None, message_id: str | None) -> DeadLetters:
        subject = self.names.dead_subject(destination) if destination else f"{self.names.prefix}.dead.*"
        out: DeadLetters = []
        async for seq, _hdrs, data in self.js.scan(self.names.dead, subject):
            try:
                x = dead_decoder.decode(data)
            except msgspec.DecodeError:
                continue
            if message_id and x.message_id != message_id:
                continue
            x.id = seq
            out.append(x)
        return out

    def replay(self, destination: str | None = None, message_id: str | None = None,
               progress: Callable[[int, int], None] = lambda done, total: None) -> DeadLetters:
        return self.run(self._replay(destination, message_id, progress))

    async def _replay(self, destination: str | None, message_id: str | None,
                      progress: Callable[[int, int], None]) -> DeadLetters:
        letters = await self._list(destination, message_id)
        now = time.time()
        for k in range(0, len(letters), QUEUE_EVERY):
            chunk = letters[k:k + QUEUE_EVERY]
            await self.publish_all([
                (self.names.retry_subject(x.destination),
                 encoder.encode(Pending(x.seq, x.data, x.source, 0, now, now, x.status, f"replayed: {x.reason}", "")),
                 f"{self.names.token(x.destination)}:{x.seq}:x{x.id}") for x in chunk])
            for x in chunk:
                try:
                    await self.js.call(f"STREAM.MSG.DELETE.{self.names.dead}", {"seq": x.id, "no_erase": True})
                except ApiError as e:
                    if e.code != 404:  # another replay took it first
                        raise
            progress(k + len(chunk), len(letters))
        return letters


class NatsArchive(_Command):
    """The ``CallArchive`` of the NATS backend: what the calls stream still
    holds (``storage.retention``), queued again as retries due now.

    A destination has "read past" a call when its consumer's ack floor is
    past the call's message; calls acknowledged beyond the floor (out of
    order, by several processes) count as not yet delivered and are not
    queued."""

    def __init__(self, storage: StorageConfig) -> None:
        super().__init__(storage)
        self._need(self.names.calls)

    def held(self) -> tuple[int, float | None, float | None]:
        """(messages held, receive time of the oldest, of the newest): a
        message holds one request's calls, or one turn of the loop's."""
        state = self.run(self.js.call(f"STREAM.INFO.{self.names.calls}"))["state"]
        if not state.get("messages"):
            return 0, None, None
        return int(state["messages"]), _time(state["first_ts"]), _time(state["last_ts"])

    def cursor(self, destination: str) -> int | None:
        return self.run(self._cursor(destination))

    async def _cursor(self, destination: str) -> int | None:
        try:
            info = await self.js.call(f"CONSUMER.INFO.{self.names.calls}.{self.names.consumer(destination)}")
        except ApiError as e:
            if e.err_code == CONSUMER_NOT_FOUND:
                return None
            raise
        return int(info["ack_floor"]["stream_seq"]) * SPAN + SPAN - 1

    def candidates(self, f: ReplayFilter) -> int:
        async def count() -> int:
            n = 0
            async for _seq, _source, calls in self._scan(f):
                n += len(calls)
            return n
        return self.run(count())

    def replay(self, destination: str, f: ReplayFilter, dry_run: bool = False,
               progress: Callable[[int, int], None] = lambda done, seen: None) -> ReplayResult:
        return self.run(self._replay(destination, f, dry_run, progress))

    async def _replay(self, destination: str, f: ReplayFilter, dry_run: bool,
                      progress: Callable[[int, int], None]) -> ReplayResult:
        cursor = await self._cursor(destination)
        result = ReplayResult()
        if cursor is None:
            return result
        now = time.time()
        run = secrets.token_hex(4)  # a replay of its own: not taken for a duplicate of an earlier one
        subject, token = self.names.retry_subject(destination), self.names.token(destination)
        batch: list[tuple[str, bytes, str]] = []
        async for seq, source, calls in self._scan(f):
            for i, call in enumerate(calls):
                pos = seq * SPAN + i
                result.seen += 1
                if not f.matches(call):
                    continue
                if pos > cursor:
                    result.not_yet_delivered += 1
                    continue
                result.matched += 1
                batch.append((subject, encoder.encode(Pending(pos, call, source, 0, now, now, None,
                                                              "replayed: gateway replay", "")),
                              f"{token}:{pos}:p{run}"))
                if len(batch) >= QUEUE_EVERY:
                    if not dry_run:
                        await self.publish_all(batch)
                    batch = []
                    progress(result.matched, result.seen)
        if batch and not dry_run:
            await self.publish_all(batch)
        progress(result.matched, result.seen)
        return result

    async def _scan(self, f: ReplayFilter) -> AsyncIterator[tuple[int, str, list[bytes]]]:
        """The messages received in the filter's range (and from its source),
        read by a consumer of the command's own, from the range's start."""
        js, names = self.js, self.names
        start = datetime.fromtimestamp(max(f.since, 0.0), timezone.utc).isoformat().replace("+00:00", "Z")
        name = f"{names.prefix}_scan_{secrets.token_hex(4)}"
        await js.call(f"CONSUMER.CREATE.{names.calls}.{name}", {"stream_name": names.calls, "config": {
            "name": name, "deliver_policy": "by_start_time", "opt_start_time": start, "ack_policy": "none",
            "mem_storage": True, "num_replicas": 1, "inactive_threshold": nanos(60)}})
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        try:
            while True:
                await self.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{names.calls}.{name}",
                                      json.dumps({"batch": SCAN_BATCH, "no_wait": True}).encode(), reply=inbox)
                got = 0
                while True:
                    msg = await sub.next_msg(timeout=10)
                    if not msg.reply:  # a status: 404 nothing more, 408 this request is over
                        break
                    got += 1
                    hdrs = msg.headers or {}
                    received = float(hdrs.get("Gw-Received") or 0)
                    if received > f.until:
                        return
                    source = unquote(hdrs.get("Gw-Source", ""))
                    if received >= f.since and (not f.source or source == f.source):
                        yield parse_reply(msg.reply)[0], source, msg.data.split(b"\n")
                    if got >= SCAN_BATCH:
                        break
                if got < SCAN_BATCH:
                    return
        finally:
            await sub.unsubscribe()
            try:
                await js.call(f"CONSUMER.DELETE.{names.calls}.{name}")
            except StorageFailed:
                pass  # it goes by itself after a minute


def _time(ts: Any) -> float | None:
    if not ts or str(ts).startswith("0001-"):
        return None
    s = str(ts).rstrip("Z")
    head, _, frac = s.partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp()
