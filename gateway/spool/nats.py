"""The spool on NATS JetStream (``storage.backend: nats``): any number of
gateway processes, on any number of hosts, share one replicated stream.

Every process publishes the calls it accepts to the calls stream and
answers 200 only once the stream has acknowledged them (stored on a quorum
of ``storage.nats.replicas``); the appends of one turn of the event loop
are one message per source, so the stream's cost is paid per request, not
per call.  A publish that gets no acknowledgement in time is sent again,
with the same ``Nats-Msg-Id`` (the stream stores it once); one that still
gets none, a full stream (``storage.max_bytes``, discard new) or no quorum
is a 503 with Retry-After.  With ``storage.dedup_window``, each call with a
client's messageId also gets a marker message in the stream, in one atomic
batch with its call (``_publish_deduplicated``).

Every process delivers: each destination has one durable pull consumer,
shared by all of them, and each process leases messages from it
(``nats_lanes.py``), sends them in order, and acknowledges each message
once all its calls are delivered, scheduled for a retry or dead-lettered.
A process that dies holding messages loses them to the others after the ack
wait.  Retries are messages of the retries stream, one per call, sent back
with a delay until they are due; dead letters are messages of the dead
letters stream.  The names: ``nats_js.py``.

A destination's consumers are created (or updated) at start, before the
server takes calls, and every process with the destination in its config
marks them as seen now and then; a consumer no process has marked for
``storage.nats.cleanup_after`` (the destination left every config) is
deleted by the next gateway that looks, with its queued retries.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import hashlib
import itertools
import logging
import secrets
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Iterator, Sequence
from urllib.parse import quote, unquote

import msgspec

from gateway.config import DestinationConfig, StorageConfig
from gateway.spool.nats_js import (
    BATCH_IDS, CONSUMER_NOT_FOUND, DUPLICATE_IN_PROCESS, META_DESTINATION, META_SEEN, MESSAGE_CALLS, NO_PEERS,
    NO_STORAGE, SPAN, STORE_FAILED, WRONG_LAST_SEQUENCE, WRONG_LAST_SEQUENCE_IN_BATCH, ApiError, Js, Names,
    ack_wait_for, connect, consumer_config, consumer_of, stream_configs,
)
from gateway.spool.nats_lanes import CallLane, Puller, RetryLane
from gateway.spool.records import Ack, Pending, Record, SpoolFull, StorageFailed

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from prometheus_client.core import Metric

log = logging.getLogger("gateway.spool.nats")

OPEN_TIMEOUT = 30.0  # seconds to reach the cluster and set up streams and consumers at start
PUBLISH_TIMEOUT = 2.0  # seconds one publish waits for the stream's acknowledgement
APPEND_DEADLINE = 5.0  # seconds an append keeps sending it again before it is a 503
#: seconds a stream's replica may be silent before it counts as down (its leader's view), and
#: that a publish without an acknowledgement makes /ready say 503 whatever the leader says
REPLICA_SILENT = 5.0
RECONNECT_GRACE = 2.0  # seconds without a connection during which appends still wait for it
ACK_TIMEOUT = 5.0  # seconds for the server to confirm acknowledgements
PROGRESS_TICK = 1.0  # seconds between looks for leases that need a progress report
READ_BYTES = 16 << 20  # bytes of calls a window holds at most (as the SQLite spool's reads)
#: what one process leases of one destination at most: two windows of the worker
MAX_LEASED_MESSAGES, MAX_LEASED_CALLS, MAX_LEASED_BYTES = 10_000, 10_000, 64 << 20
MAX_LEASED_RETRIES = 10_000
PUBLISHES_IN_FLIGHT = 512  # retries and dead letters one ack publishes at once
PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

pending_encoder = msgspec.msgpack.Encoder()


class _Group:
    """The appends of one source in this turn of the loop."""

    __slots__ = ("rows", "ids", "waiters")

    def __init__(self) -> None:
        self.rows: list[bytes] = []
        self.ids: list[str | None] = []  # the messageId of each row (None: none to deduplicate on)
        #: (future, index of its first row, how many)
        self.waiters: list[tuple[asyncio.Future[list[int]], int, int]] = []


class _Destination:
    """One destination's two consumers and what this process holds of them."""

    def __init__(self, spool: "NatsSpool", name: str, ack_wait: float) -> None:
        self.spool = spool
        self.name = name
        self.ack_wait = ack_wait
        names = spool.names
        self.consumer = names.consumer(name)
        self.retry_subject = names.retry_subject(name)
        self.dead_subject = names.dead_subject(name)
        self.calls = CallLane(MAX_LEASED_MESSAGES, MAX_LEASED_CALLS, MAX_LEASED_BYTES)
        self.retries = RetryLane(MAX_LEASED_RETRIES)
        self.call_puller = Puller(names.calls, self.consumer, self.calls.room, self._on_call, self.repair)
        self.retry_puller = Puller(names.retries, self.consumer, self.retries.room, self._on_retry, self.repair)
        self.started = False
        #: acknowledgements the server did not confirm: sent again with the next ack
        self.unconfirmed: list[str] = []

    async def ensure(self) -> None:
        """Create the consumers, or update them (marking them seen)."""
        js, names = self.spool._api(), self.spool.names
        await js.ensure_consumer(names.calls, consumer_config(names, self.name, self.ack_wait, retry=False))
        await js.ensure_consumer(names.retries, consumer_config(names, self.name, self.ack_wait, retry=True))

    async def repair(self) -> None:
        """A pull request found no consumer to answer it: during an election
        nothing is to be done (pulls go on); a consumer that is gone (deleted
        by hand, or by a gateway that thought the destination removed) is
        made again, at the end of the stream."""
        js, names = self.spool.js, self.spool.names
        if js is None:
            return
        for stream in (names.calls, names.retries):
            try:
                await js.call(f"CONSUMER.INFO.{stream}.{self.consumer}", timeout=2.0)
            except ApiError as e:
                if e.err_code == CONSUMER_NOT_FOUND:
                    log.warning("%s: the consumer %s of %s is gone; making it again", self.name, self.consumer, stream)
                    await self.ensure()
                    return
                raise
            except StorageFailed:
                return  # no answer: an election, or no quorum

    async def start(self, nc: "Client") -> None:
        await self.call_puller.start(nc)
        await self.retry_puller.start(nc)
        self.started = True

    def _on_call(self, msg: "Msg") -> None:
        if self.calls.add(msg, time.time()):
            self.spool._notify()

    def _on_retry(self, msg: "Msg") -> None:
        try:
            delay = self.retries.add(msg, time.time())
        except msgspec.DecodeError as e:
            log.error("%s: a message of %s is not a retry (%s); dropping it", self.name, self.retry_subject, e)
            self.spool._send(msg.reply, b"+TERM")
            return
        if delay is not None:
            self.spool._send(msg.reply, b'-NAK {"delay": %d}' % int(delay * 1e9))
        else:
            self.spool._notify()


class NatsSpool:
    """The spool backend of ``storage.backend: nats`` (see the module)."""

    def __init__(self, storage: StorageConfig, destinations: Sequence[DestinationConfig] = (),
                 on_commit: Callable[[float], None] = lambda seconds: None) -> None:
        assert storage.nats is not None
        self.cfg = storage.nats
        self.names = Names(self.cfg.stream)
        self.max_bytes = int(storage.max_bytes)
        #: seconds a stored messageId keeps a call with the same id out (0: off)
        self.dedup_window = float(storage.dedup_window)
        self.on_commit = on_commit
        #: the stream's messages (a request, or a turn of the loop, each) and
        #: bytes, as of the last look, plus what this process stored since
        self.rows = 0
        self.bytes = 0
        self.restarts = 0  # reconnections
        self.min_free_bytes = 0
        self.configured = {d.name: d for d in destinations}
        self.enabled = [d.name for d in destinations if d.enabled]
        self.nc: "Client | None" = None
        self.js: Js | None = None
        self.dests: dict[str, _Destination] = {}
        self._dest_locks: dict[str, asyncio.Lock] = {}
        self._listeners: list[asyncio.Event] = []
        self._pending: dict[str, _Group] = {}
        self._flush_queued = False
        self._publishing: set[asyncio.Future[None]] = set()
        self._source_headers: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._instance = secrets.token_hex(6)
        self._closing = False
        self._down_since: float | None = None
        self._failing_since: float | None = None  # since when publishes get no acknowledgement
        self._failing_why = ""
        self._stored_at = -1e9  # when a publish was last acknowledged
        self._tasks: list[asyncio.Task[None]] = []
        self._opened_at = 0.0
        self._seen_at = 0.0  # when this process last marked its consumers seen
        self._infos: dict[str, dict[str, Any]] = {}  # consumer name -> info, calls stream
        self._retry_infos: dict[str, dict[str, Any]] = {}
        #: for /metrics
        self.in_flight = 0
        self.publish_retries = 0
        self.publish_counts = [0] * (len(PUBLISH_BUCKETS) + 1)
        self.publish_sum = 0.0
        self.cleaned = 0

    # -- life cycle -------------------------------------------------------

    @property
    def free_bytes(self) -> int:
        """Room left in the calls stream (JetStream's disks are the servers')."""
        return max(0, self.max_bytes - self.bytes)

    async def open(self) -> None:
        """Reach the cluster, create or update the streams and every
        configured destination's consumers; StorageFailed after OPEN_TIMEOUT."""
        self._closing = False
        deadline = time.monotonic() + OPEN_TIMEOUT
        self.nc = await connect(self.cfg, purpose="spool", timeout=OPEN_TIMEOUT, forever=True,
                                disconnected=self._disconnected, reconnected=self._reconnected, error=self._error)
        self.js = Js(self.nc)
        try:
            while True:
                try:
                    for want in stream_configs(self.names, self.cfg, self.max_bytes, self.dedup_window > 0):
                        await self.js.ensure_stream(want)
                    for name in self.enabled:
                        await self._destination(name)
                    break
                except StorageFailed as e:
                    if isinstance(e, ApiError) and e.err_code == NO_STORAGE:
                        raise StorageFailed(f"cannot create the stream {self.names.calls}: the servers cannot "
                                            f"reserve storage.max_bytes ({self.max_bytes} bytes) on each of "
                                            f"{self.cfg.replicas} replica(s): lower storage.max_bytes or raise "
                                            f"jetstream.max_file_store ({e.description})") from None
                    refused = isinstance(e, ApiError) and e.code == 400 and e.err_code != NO_PEERS
                    if time.monotonic() > deadline or refused:
                        raise StorageFailed(f"cannot set up the JetStream streams {self.names.prefix}_*: {e}") from None
                    log.warning("JetStream is not ready (%s); trying again", e)
                    await asyncio.sleep(0.5)
            await self._look_at_stream()
        except BaseException:
            await self._close_connection()
            raise
        self._opened_at = self._seen_at = time.monotonic()
        self._tasks.append(asyncio.create_task(self._progress_loop(), name="nats-progress"))

    async def _destination(self, name: str) -> _Destination:
        """A destination's consumers and lanes, created at first use."""
        d = self.dests.get(name)
        if d is not None and d.started:
            return d
        lock = self._dest_locks.setdefault(name, asyncio.Lock())
        async with lock:
            d = self.dests.get(name)
            if d is None:
                dc = self.configured.get(name)
                d = _Destination(self, name, ack_wait_for(dc.timeout if dc is not None else 30.0))
                await d.ensure()
                self.dests[name] = d
            if not d.started:
                assert self.nc is not None
                await d.start(self.nc)
        return d

    async def close(self) -> None:
        """Store what is pending; hand what this process holds back to the
        others at once (nak, no delay: no waiting for the ack wait)."""
        if self._flush_queued:
            self._flush()
        if self._publishing:
            await asyncio.wait(set(self._publishing), timeout=APPEND_DEADLINE + 1)
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._tasks.clear()
        now = time.time()
        naks: list[tuple[str, bytes]] = []
        for d in self.dests.values():
            await d.call_puller.stop()
            await d.retry_puller.stop()
            d.started = False
            naks += [(reply, b"-NAK") for reply in d.calls.release()]
            for x in d.retries.release():
                wait = x.pending.next_at - now
                naks.append((x.reply, b'-NAK {"delay": %d}' % int(wait * 1e9) if wait > 0 else b"-NAK"))
        nc = self.nc
        if nc is not None and nc.is_connected:
            try:
                for reply, nak in naks:  # before the drain below sends what is pending
                    await nc.publish(reply, nak)
            except Exception as e:  # noqa: BLE001 - they come back after their ack wait instead
                log.warning("could not hand back %d leased message(s): %s", len(naks), e)
        await self._close_connection()

    async def _close_connection(self) -> None:
        nc, self.nc = self.nc, None
        if nc is None:
            return
        try:
            if nc.is_connected:
                await asyncio.wait_for(nc.drain(), 6)
            else:
                await nc.close()
        except Exception:  # noqa: BLE001 - closing: nothing left to save
            try:
                await nc.close()
            except Exception:  # noqa: BLE001
                pass

    def _failing(self, why: str) -> None:
        """A publish got no acknowledgement: /ready says so until one does."""
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        self._failing_why = why

    async def _disconnected(self) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
        if not self._closing:
            log.warning("disconnected from NATS; reconnecting over %s", ", ".join(self.cfg.servers))

    async def _reconnected(self) -> None:
        self._down_since = None
        self.restarts += 1
        url = self.nc.connected_url.netloc if self.nc is not None and self.nc.connected_url else "?"
        log.warning("reconnected to NATS at %s", url)
        for d in self.dests.values():
            d.call_puller.reset()
            d.retry_puller.reset()
        self._notify()

    async def _error(self, e: Exception) -> None:
        if not self._closing:
            log.warning("NATS: %s: %s", type(e).__name__, e)

    def subscribe(self) -> asyncio.Event:
        """An event set whenever calls or retries arrive for this process."""
        ev = asyncio.Event()
        self._listeners.append(ev)
        return ev

    def _notify(self) -> None:
        for ev in self._listeners:
            ev.set()

    def _send(self, subject: str, payload: bytes) -> None:
        """An acknowledgement (ack, nak, progress, term) without waiting for the server."""
        nc = self.nc
        if nc is None or nc.is_closed:
            return
        asyncio.ensure_future(self._publish_quietly(nc, subject, payload))

    @staticmethod
    async def _publish_quietly(nc: "Client", subject: str, payload: bytes) -> None:
        try:
            await nc.publish(subject, payload)
        except Exception as e:  # noqa: BLE001 - the message comes back after its ack wait
            log.debug("could not send %r to %s: %s", payload[:8], subject, e)

    # -- ingest -----------------------------------------------------------

    def room_problem(self, size: int = 1) -> str | None:
        """Why ``size`` more bytes of calls would be refused now, if they would."""
        if self.bytes + size > self.max_bytes:
            return (f"the stream {self.names.calls} holds {self.bytes} bytes; "
                    f"storage.max_bytes is {self.max_bytes}")
        down = self._down_for()
        if down > RECONNECT_GRACE:
            return f"not connected to NATS for {down:.0f}s (reconnecting over {', '.join(self.cfg.servers)})"
        return None

    def _down_for(self) -> float:
        if self.nc is None:
            return float("inf")
        if self._down_since is None:
            return 0.0
        return time.monotonic() - self._down_since

    async def append(self, source: str, rows: list[bytes], ids: list[str | None] | None = None) -> int:
        """Store calls; returns once the stream acknowledged them.

        With ``ids`` (one per row, None for none) and a ``dedup_window``, a
        call whose messageId was stored within it is left out, and the
        number left out is returned (``_publish_deduplicated``).  The
        publishes of one append are deduplicated by ``Nats-Msg-Id`` when they
        are sent again."""
        if not rows:
            return 0
        size = sum(map(len, rows)) + len(rows)
        problem = self.room_problem(size)
        if problem is not None:
            raise SpoolFull(problem) if self.bytes + size > self.max_bytes else StorageFailed(problem)
        if self._closing:
            raise StorageFailed("the spool is closing")
        waiter: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        group = self._pending.get(source)
        if group is None:
            group = self._pending[source] = _Group()
        group.waiters.append((waiter, len(group.rows), len(rows)))
        group.rows.extend(rows)
        group.ids.extend(ids if ids and self.dedup_window > 0 else [None] * len(rows))
        if not self._flush_queued:
            self._flush_queued = True
            asyncio.get_running_loop().call_soon(self._flush)
        left_out = await waiter
        # until the next look at the stream
        self.bytes += size - sum(len(rows[i]) + 1 for i in left_out)
        return len(left_out)

    def _flush(self) -> None:
        """Publish the appends of this turn: a message per source (more when
        they exceed the server's max_payload)."""
        pending, self._pending, self._flush_queued = self._pending, {}, False
        now = f"{time.time():.6f}"
        for source, group in pending.items():
            fut = asyncio.ensure_future(self._publish_group(source, group.rows, group.ids, now))
            self._publishing.add(fut)
            fut.add_done_callback(self._publishing.discard)
            fut.add_done_callback(functools.partial(self._settle, group.waiters))

    @staticmethod
    def _settle(waiters: list[tuple[asyncio.Future[list[int]], int, int]], job: asyncio.Future[list[int]]) -> None:
        """Answer every append of a group, each with the indexes of its calls left out."""
        exc = StorageFailed("the spool closed before the calls were stored") if job.cancelled() else job.exception()
        left_out = [] if exc is not None else job.result()
        for w, start, count in waiters:
            if not w.done():
                if exc is None:
                    w.set_result([i - start for i in left_out[bisect.bisect_left(left_out, start):
                                                              bisect.bisect_left(left_out, start + count)]])
                else:
                    w.set_exception(exc)

    def _chunks(self, rows: list[bytes], per_message: int) -> Iterator[tuple[int, int]]:
        """(start, end) of the rows of each message: within max_payload and ``per_message`` rows."""
        limit = (self.nc.max_payload if self.nc is not None else 1 << 20) - 1024
        start, size = 0, 0
        for i, row in enumerate(rows):
            n = len(row) + 1
            if i > start and (size + n > limit or i - start >= per_message):
                yield start, i
                start, size = i, 0
            size += n
        yield start, len(rows)

    async def _publish_group(self, source: str, rows: list[bytes], ids: list[str | None], received: str) -> list[int]:
        """Publish a group's calls (a message per chunk); the indexes of the
        calls left out as duplicates, in order."""
        hdr = self._source_headers.get(source)
        if hdr is None:
            hdr = self._source_headers[source] = quote(source, safe="")
        subject = self.names.calls_subject
        headers = {"Gw-Source": hdr, "Gw-Received": received}
        dedup = any(ids)
        left_out: list[int] = []
        if dedup:  # the same id twice in one group: the first is the one stored
            seen: set[str] = set()
            for i, mid in enumerate(ids):
                if mid is not None:
                    if mid in seen:
                        left_out.append(i)
                    seen.add(mid)
        skip = set(left_out)
        #: the indexes of the rows of each message, and the job that publishes it
        messages: list[tuple[list[int], Awaitable[list[int] | None]]] = []
        for start, end in self._chunks(rows, BATCH_IDS if dedup else MESSAGE_CALLS):
            mine = [i for i in range(start, end) if i not in skip]
            h = {**headers, "Nats-Msg-Id": f"{self._instance}-{next(self._ids)}"}
            job = (self._publish_deduplicated(subject, [rows[i] for i in mine], [ids[i] for i in mine], h) if dedup
                   else self._publish(subject, b"\n".join(rows[start:end]), h))
            messages.append((mine, job))
        results = await asyncio.gather(*(job for _, job in messages), return_exceptions=True) \
            if len(messages) > 1 else [await messages[0][1]]
        for r in results:
            if isinstance(r, BaseException):
                raise r
        for (mine, _), dups in zip(messages, results):
            left_out += [mine[k] for k in dups or ()]  # type: ignore[union-attr]
        return sorted(left_out)

    def id_subject(self, message_id: str) -> str:
        """The subject of a stored messageId's marker (a hash: any string is an id)."""
        return f"{self.names.ids_prefix}.{hashlib.blake2b(message_id.encode(), digest_size=16).hexdigest()}"

    async def _publish_deduplicated(self, subject: str, rows: list[bytes], ids: list[str | None],
                                    headers: dict[str, str]) -> list[int]:
        """Store ``rows`` except those whose messageId has a marker in the
        stream, and a marker (expiring after the dedup window) for each id
        stored, in one atomic batch: a marker exists exactly when its call
        was stored, whichever gateway stored it, and a crash cannot part
        them.  Returns the indexes left out.

        A marker that exists already fails the whole batch; the markers of
        its ids are looked up, the duplicates left out, and the rest sent
        again.  A marker holding this group's key means an earlier attempt
        of this very group was stored (its acknowledgement was lost)."""
        import nats.errors

        nc = self.nc
        if nc is None:
            raise StorageFailed("the spool is closed")
        key = headers["Nats-Msg-Id"].encode()
        ttl = f"{max(1, int(self.dedup_window))}s"
        subjects = [self.id_subject(m) if m is not None else None for m in ids]
        dups: set[int] = set()
        end = time.monotonic() + APPEND_DEADLINE
        why = "no acknowledgement"
        attempt = -1
        while True:
            attempt += 1
            left = end - time.monotonic()
            if left <= 0:
                raise StorageFailed(f"the stream did not store the calls: {why}")
            keep = [i for i in range(len(rows)) if i not in dups]
            if not keep:
                return sorted(dups)
            markers = [subjects[i] for i in keep if subjects[i] is not None]
            payload = b"\n".join(rows[i] for i in keep)
            if not markers:
                await self._publish(subject, payload, headers, end)
                return sorted(dups)
            batch = f"{headers['Nats-Msg-Id']}-{attempt}"
            if attempt:
                self.publish_retries += 1
            started = time.perf_counter()
            self.in_flight += 1
            try:
                for k, marker in enumerate(markers, 1):
                    await nc.publish(marker, key, headers={
                        "Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(k),
                        "Nats-Expected-Last-Subject-Sequence": "0", "Nats-TTL": ttl})
                msg = await nc.request(subject, payload, timeout=min(PUBLISH_TIMEOUT, left), headers={
                    **headers, "Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(len(markers) + 1),
                    "Nats-Batch-Commit": "1"})
                resp = msgspec.json.decode(msg.data)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
                why = f"no acknowledgement ({type(e).__name__})"
                self._failing(why)
                resp = None
            except nats.errors.Error as e:
                raise StorageFailed(f"NATS: {type(e).__name__}: {e}".rstrip(": ")) from None
            finally:
                self.in_flight -= 1
            err = resp.get("error") if isinstance(resp, dict) else {"err_code": None}
            if not err:
                self._stored(time.perf_counter() - started)
                return sorted(dups)
            if err.get("err_code") not in (None, WRONG_LAST_SEQUENCE, WRONG_LAST_SEQUENCE_IN_BATCH,
                                           DUPLICATE_IN_PROCESS):
                self._refused(resp, subject)  # type: ignore[arg-type]
            # Which of these ids are stored already (or was it this group, at an earlier attempt)?
            found = await self._markers([subjects[i] for i in keep])
            if key in found.values():
                self._stored(time.perf_counter() - started)
                return sorted(dups)
            new = {i for i in keep if subjects[i] in found}
            if not new and err.get("err_code") is not None:
                why = f"the stream refused the batch: {err.get('description')} (error {err.get('err_code')})"
                await asyncio.sleep(min(0.05 * (attempt + 1), max(0.0, end - time.monotonic())))
            dups |= new

    async def _markers(self, subjects: list[str | None]) -> dict[str, bytes]:
        """The markers that exist among ``subjects``: subject -> the key of the group that stored it."""
        import base64

        js = self._api()
        wanted = sorted({s for s in subjects if s is not None})

        async def one(subj: str) -> tuple[str, bytes | None]:
            try:
                got = await js.call(f"STREAM.MSG.GET.{self.names.calls}", {"last_by_subj": subj})
            except ApiError as e:
                if e.code == 404:
                    return subj, None
                raise
            return subj, base64.b64decode(got["message"].get("data") or "")
        found: dict[str, bytes] = {}
        for k in range(0, len(wanted), PUBLISHES_IN_FLIGHT):
            for subj, data in await asyncio.gather(*(one(s) for s in wanted[k:k + PUBLISHES_IN_FLIGHT])):
                if data is not None:
                    found[subj] = data
        return found

    def _stored(self, took: float) -> None:
        """A publish (or an atomic batch) was acknowledged after ``took`` seconds."""
        self._failing_since = None
        self._stored_at = time.monotonic()
        self.on_commit(took)
        self.publish_counts[bisect.bisect_left(PUBLISH_BUCKETS, took)] += 1
        self.publish_sum += took

    def _refused(self, resp: dict[str, Any], subject: str) -> None:
        """Raise what a refusal of the stream means: SpoolFull when it is full."""
        err = resp["error"]
        desc = str(err.get("description", ""))
        if err.get("err_code") == STORE_FAILED and "maximum" in desc:
            self.bytes = max(self.bytes, self.max_bytes)  # refused until the next look says otherwise
            raise SpoolFull(f"the stream {resp.get('stream') or subject} is full: {desc} "
                            f"(storage.max_bytes {self.max_bytes})")
        raise StorageFailed(f"the stream refused the calls: {desc} (error {err.get('err_code')})")

    async def _publish(self, subject: str, payload: bytes, headers: dict[str, str],
                       deadline: float | None = None) -> None:
        """Publish to a stream and wait for its acknowledgement; sent again
        (same headers, so the same Nats-Msg-Id) until ``deadline``."""
        import nats.errors

        nc = self.nc
        if nc is None:
            raise StorageFailed("the spool is closed")
        end = time.monotonic() + APPEND_DEADLINE if deadline is None else deadline
        why = "no acknowledgement"
        first = True
        while True:
            left = end - time.monotonic()
            if left <= 0 or (not first and self._down_for() > RECONNECT_GRACE):
                raise StorageFailed(f"the stream did not store the calls: {why}")
            if not first:
                self.publish_retries += 1
            first = False
            started = time.perf_counter()
            self.in_flight += 1
            try:
                msg = await nc.request(subject, payload, timeout=min(PUBLISH_TIMEOUT, left), headers=headers)
            except nats.errors.NoRespondersError:
                why = "no stream leader answers (an election, or no quorum)"
                self._failing(why)
                await asyncio.sleep(min(0.2, max(0.0, end - time.monotonic())))
                continue
            except nats.errors.TimeoutError:
                why = f"no acknowledgement within {PUBLISH_TIMEOUT:.0f}s (no quorum?)"
                self._failing(why)
                continue
            except nats.errors.MaxPayloadError:
                raise StorageFailed(f"a message of {len(payload)} bytes is over the server's max_payload") from None
            except nats.errors.Error as e:
                raise StorageFailed(f"NATS: {type(e).__name__}: {e}".rstrip(": ")) from None
            finally:
                self.in_flight -= 1
            resp = msgspec.json.decode(msg.data)
            err = resp.get("error") if isinstance(resp, dict) else None
            if err and err.get("err_code") == DUPLICATE_IN_PROCESS:
                # The first attempt is still waiting for its quorum: so do we.
                why = "the first attempt is still waiting for a quorum"
                self._failing(why)
                await asyncio.sleep(min(0.1, max(0.0, end - time.monotonic())))
                continue
            if err:
                self._refused(resp, subject)
            self._stored(time.perf_counter() - started)
            return

    # -- delivery ---------------------------------------------------------

    async def cursor(self, destination: str) -> int:
        """The newest cursor this process's acks covered (0 at start): a
        window after it starts at the first call this process holds and has
        not finished.  The consumer, created at the end for a new
        destination, keeps the shared position."""
        d = await self._destination(destination)
        return d.calls.cursor

    async def read(self, after: int, limit: int) -> list[Record]:
        """Up to ``limit`` calls of the stream after position ``after``, in
        order (the log itself, leased to nobody: tools and tests)."""
        js = self._api()
        out: list[Record] = []
        async for seq, hdrs, data in js.scan(self.names.calls, self.names.calls_subject, max(1, after // SPAN)):
            source, received = unquote(hdrs.get("Gw-Source", "")), float(hdrs.get("Gw-Received") or 0)
            for i, call in enumerate(data.split(b"\n")):
                pos = seq * SPAN + i
                if pos > after:
                    out.append(Record(pos, source, received, call))
                    if len(out) >= limit:
                        return out
        return out

    async def window(self, destination: str, after: int, limit: int) -> list[Record]:
        """The calls this process should deliver next to the destination: up
        to ``limit`` after ``after``, leased from its consumer (CallLane)."""
        d = await self._destination(destination)
        got = d.calls.window(after, limit, READ_BYTES)
        if not got:
            await d.call_puller.poll()
            got = d.calls.window(after, limit, READ_BYTES)
        return got

    async def due(self, destination: str, now: float, limit: int, exclude: Iterable[int] = ()) -> list[Pending]:
        """Retries of the destination due now, soonest first.  Only what is
        due about now: the others wait on the server until they are."""
        d = await self._destination(destination)
        got = d.retries.due(now, limit, exclude)
        if not got:
            await d.retry_puller.poll()
            got = d.retries.due(now, limit, exclude)
        return got

    async def ack(self, ack: Ack) -> None:
        """Store what one delivery step decided: first its retries and dead
        letters (each a message, with a Nats-Msg-Id of its origin, so that a
        step stored again stores nothing twice), then the acknowledgements
        of what it finished, confirmed by the server.  Raises StorageFailed;
        then the calls it covers stay leased and are planned again."""
        d = await self._destination(ack.destination)
        token = self.names.token(ack.destination)
        # The entries this step finishes or replaces, as they are before its
        # publishes: the replacing entry may come back to this process at once.
        finished = {seq: d.retries.held(seq) for seq in itertools.chain(ack.done, (p.seq for p in ack.retry))}
        jobs: list[tuple[str, bytes, dict[str, str]]] = []
        for p in ack.retry:
            origin = d.retries.origin(p.seq)
            jobs.append((d.retry_subject, pending_encoder.encode(p),
                         {"Nats-Msg-Id": f"{token}:{p.seq}:{'r%d' % origin if origin else 'm'}"}))
        for x in ack.dead:
            origin = d.retries.origin(x.seq)
            if x.destination != ack.destination:
                x = msgspec.structs.replace(x, destination=ack.destination)
            jobs.append((d.dead_subject, pending_encoder.encode(x),
                         {"Nats-Msg-Id": f"{token}:{x.seq}:d{'r%d' % origin if origin else 'm'}"}))
        if jobs:
            await self._publish_all(jobs)
        replies, d.unconfirmed = d.unconfirmed, []  # a step stored again: its acks go again too
        for seq, sseqs in finished.items():
            replies.extend(x.reply for x in d.retries.take(seq, sseqs))
        if ack.cursor is not None:
            replies.extend(d.calls.cover(ack.cursor))
            d.call_puller.wake.set()
        if replies:
            d.retry_puller.wake.set()
            try:
                await self._ack_all(replies)
            except StorageFailed:
                d.unconfirmed = replies
                raise

    async def _publish_all(self, jobs: list[tuple[str, bytes, dict[str, str]]]) -> None:
        sem = asyncio.Semaphore(PUBLISHES_IN_FLIGHT)
        deadline = time.monotonic() + APPEND_DEADLINE

        async def one(subject: str, payload: bytes, headers: dict[str, str]) -> None:
            async with sem:
                await self._publish(subject, payload, headers, deadline)
        results = await asyncio.gather(*(one(*j) for j in jobs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r if isinstance(r, StorageFailed) else StorageFailed(f"{type(r).__name__}: {r}")

    async def _ack_all(self, replies: list[str]) -> None:
        """Acknowledge messages and wait for the server to confirm each."""
        import nats.errors

        nc = self.nc
        if nc is None:
            raise StorageFailed("the spool is closed")
        try:
            # One confirmation per step: acks of one connection reach a
            # consumer in order, so the answer to the last of a consumer's
            # acks comes once the server has taken every one before it.
            last: dict[str, str] = {}
            for r in replies:
                last[consumer_of(r)] = r
            confirm = set(last.values())
            for r in replies:
                if r not in confirm:
                    await nc.publish(r, b"+ACK")
            await asyncio.gather(*(nc.request(r, b"+ACK", timeout=ACK_TIMEOUT) for r in confirm))
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            raise StorageFailed(f"the acknowledgements were not confirmed: {type(e).__name__}: {e}") from None

    async def stats(self, destination: str) -> tuple[int, int, float | None]:
        """(messages not yet acknowledged by the destination's consumer, calls
        waiting for a retry, receive time of the oldest of them), as of the
        last purge's look at the consumers."""
        consumer = self.names.consumer(destination)
        c, r = self._infos.get(consumer), self._retry_infos.get(consumer)
        backlog = int(c["num_pending"]) + int(c["num_ack_pending"]) if c else 0
        retries = int(r["num_pending"]) + int(r["num_ack_pending"]) if r else 0
        ages: list[float] = []
        js = self._api()
        if backlog and c is not None:
            got = await js.get(self.names.calls, int(c["ack_floor"]["stream_seq"]) + 1, self.names.calls_subject)
            if got is not None:
                ages.append(float(got[1].get("Gw-Received") or time.time()))
        if retries:
            got = await js.get(self.names.retries, 1, self.names.retry_subject(destination))
            if got is not None:
                try:
                    ages.append(msgspec.msgpack.decode(got[2], type=Pending).first_failed)
                except msgspec.DecodeError:
                    pass
        return backlog, retries, (min(ages) if ages else None)

    def _api(self) -> Js:
        if self.js is None or self.nc is None:
            raise StorageFailed("the spool is not open")
        return self.js

    async def purge(self, destinations: list[str], retention: float) -> int:
        """Housekeeping, every few seconds in every process: look at the
        consumers; remove the messages every consumer has acknowledged (and
        older than ``retention``); mark this process's destinations seen;
        delete the consumers of destinations no process has marked for
        ``cleanup_after``.  Returns the messages removed."""
        js = self._api()
        names = self.names
        infos = await js.consumers(names.calls)
        retry_infos = await js.consumers(names.retries)
        self._infos = {c["name"]: c for c in infos}
        self._retry_infos = {c["name"]: c for c in retry_infos}
        now = time.monotonic()
        if now - self._seen_at >= self._seen_every():
            self._seen_at = now
            for name in self.enabled:
                await self._destination(name)
                await self.dests[name].ensure()
        if now - self._opened_at >= self.cfg.cleanup_after:
            await self._clean_up(infos, retry_infos)
        disabled = {names.consumer(n) for n, dc in self.configured.items() if not dc.enabled}
        state = (await js.call(f"STREAM.INFO.{names.calls}"))["state"]
        floors = [int(c["ack_floor"]["stream_seq"]) for c in infos if c["name"] not in disabled]
        upto = min(floors) + 1 if floors else int(state["last_seq"]) + 1
        if retention > 0:
            since = datetime.fromtimestamp(time.time() - retention, timezone.utc).isoformat().replace("+00:00", "Z")
            try:
                got = await js.call(f"STREAM.MSG.GET.{names.calls}", {"start_time": since})
                upto = min(upto, int(got["message"]["seq"]))
            except ApiError as e:
                if e.code != 404:
                    raise
        removed = 0
        # A consumer of this process's own that is not listed (being made again, or not
        # reachable) holds the purge back until it is, or its calls would go with the rest.
        listed = {names.consumer(n) for n in destinations} <= self._infos.keys()
        if listed and upto > int(state["first_seq"]) and int(state["messages"]):
            # The calls only: a messageId's marker goes when its dedup window is over (its TTL).
            removed = int((await js.call(f"STREAM.PURGE.{names.calls}",
                                         {"seq": upto, "filter": names.calls_subject})).get("purged", 0))
        if removed:
            state = (await js.call(f"STREAM.INFO.{names.calls}"))["state"]
        self.rows, self.bytes = int(state["messages"]), int(state["bytes"])
        return removed

    def _seen_every(self) -> float:
        """How often this process marks its consumers seen: four times per cleanup_after."""
        return max(0.5, min(self.cfg.cleanup_after / 4, 600.0))

    async def _clean_up(self, infos: list[dict[str, Any]], retry_infos: list[dict[str, Any]]) -> None:
        js, names = self._api(), self.names
        mine = {names.consumer(n) for n in self.enabled}
        limit = self.cfg.cleanup_after
        for stream, found in ((names.calls, infos), (names.retries, retry_infos)):
            for c in found:
                meta = (c.get("config") or {}).get("metadata") or {}
                dest = meta.get(META_DESTINATION)
                if dest is None or c["name"] in mine or time.time() - float(meta.get(META_SEEN) or 0) < limit:
                    continue
                try:  # look again just before: a gateway that has it may have marked it meanwhile
                    fresh = await js.call(f"CONSUMER.INFO.{stream}.{c['name']}")
                    meta = (fresh.get("config") or {}).get("metadata") or {}
                    idle = time.time() - float(meta.get(META_SEEN) or 0)
                    if idle < limit:
                        continue
                    await js.call(f"CONSUMER.DELETE.{stream}.{c['name']}")
                    if stream == names.retries:
                        await js.call(f"STREAM.PURGE.{names.retries}", {"filter": names.retry_subject(dest)})
                except ApiError as e:
                    if e.err_code == CONSUMER_NOT_FOUND:
                        continue  # another gateway deleted it first
                    raise
                self.cleaned += 1
                log.warning("deleted the consumer %s of %s, destination %r: no running gateway has had it in "
                            "its config for %.0fs (storage.nats.cleanup_after)", c["name"], stream, dest, idle)

    async def _look_at_stream(self) -> None:
        state = (await self._api().call(f"STREAM.INFO.{self.names.calls}"))["state"]
        self.rows, self.bytes = int(state["messages"]), int(state["bytes"])

    async def check_writable(self) -> None:
        """StorageFailed unless connected and the calls stream's leader answers."""
        if self.nc is None or not self.nc.is_connected:
            raise StorageFailed(f"not connected to NATS (reconnecting over {', '.join(self.cfg.servers)})")
        failing = self._failing_since
        if failing is not None and time.monotonic() - failing < REPLICA_SILENT:
            raise StorageFailed(f"the stream has stored nothing for {time.monotonic() - failing:.0f}s: "
                                f"{self._failing_why}")
        info = await self._api().call(f"STREAM.INFO.{self.names.calls}", timeout=1.5)
        cluster = info.get("cluster") or {}
        if cluster.get("leader") and time.monotonic() - self._stored_at < REPLICA_SILENT:
            return  # a quorum stored a publish just now (replicas catching up count as not current)
        replicas = cluster.get("replicas") or []
        # A leader that lost its followers says it leads for a while; their
        # silence (``active``: nanoseconds since it last heard them) tells.
        down = [str(r.get("name")) for r in replicas
                if not r.get("current") or int(r.get("active") or 0) > REPLICA_SILENT * 1e9]
        if not cluster.get("leader") or 1 + len(replicas) - len(down) < (1 + len(replicas)) // 2 + 1:
            raise StorageFailed(f"the stream {self.names.calls} has no quorum: too few of its replicas answer "
                                f"(silent: {', '.join(down) or 'every one'})")
        self._failing_since = None  # a quorum again: the next publish will tell

    async def _progress_loop(self) -> None:
        """Report progress on what is held longer than a third of its ack wait."""
        while True:
            await asyncio.sleep(PROGRESS_TICK)
            now = time.time()
            for d in list(self.dests.values()):
                for e in d.calls.stale(now, d.ack_wait / 3):
                    e.touched = now
                    self._send(e.reply, b"+WPI")
                for x in d.retries.stale(now, d.ack_wait / 3):
                    x.touched = now
                    self._send(x.reply, b"+WPI")

    # -- metrics ----------------------------------------------------------

    def collect_extra(self) -> Iterator["Metric"]:
        """The backend's own series for /metrics."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        nc = self.nc
        yield GaugeMetricFamily("gateway_nats_connected", "1 while connected to a NATS server",
                                value=1 if nc is not None and nc.is_connected else 0)
        yield CounterMetricFamily("gateway_nats_reconnects", "Times the connection to NATS was lost and made "
                                  "again", value=self.restarts)
        yield GaugeMetricFamily("gateway_nats_publishes_in_flight", "Publishes to a stream not yet "
                                "acknowledged by it", value=self.in_flight)
        yield CounterMetricFamily("gateway_nats_publish_retries", "Publishes sent again (same Nats-Msg-Id) "
                                  "after a timeout or while no leader answered", value=self.publish_retries)
        yield CounterMetricFamily("gateway_nats_consumers_deleted", "Consumers of destinations no gateway "
                                  "had in its config, deleted by this process", value=self.cleaned)
        buckets, acc = [], 0
        for bound, n in zip((*PUBLISH_BUCKETS, float("inf")), self.publish_counts):
            acc += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
        h = HistogramMetricFamily("gateway_nats_publish_seconds", "From publishing calls to the stream's "
                                  "acknowledgement (stored on a quorum)")
        h.add_metric([], buckets, self.publish_sum)
        yield h
        leased = GaugeMetricFamily("gateway_nats_leased_calls", "Calls this process holds from the "
                                   "destination's consumer, delivered to it and not yet acknowledged",
                                   labels=["destination"])
        lag = GaugeMetricFamily("gateway_nats_consumer_pending_messages", "Messages of the calls stream the "
                                "destination's consumer has not delivered to any gateway yet (its lag)",
                                labels=["destination"])
        unacked = GaugeMetricFamily("gateway_nats_consumer_ack_pending_messages", "Messages delivered to some "
                                    "gateway and not yet acknowledged", labels=["destination"])
        redelivered = GaugeMetricFamily("gateway_nats_consumer_redelivered_messages", "Messages delivered more "
                                        "than once and not yet acknowledged", labels=["destination"])
        for name, d in sorted(self.dests.items()):
            leased.add_metric([name], d.calls.calls)
            c = self._infos.get(d.consumer)
            if c is not None:
                lag.add_metric([name], int(c["num_pending"]))
                unacked.add_metric([name], int(c["num_ack_pending"]))
                redelivered.add_metric([name], int(c["num_redelivered"]))
        yield from (leased, lag, unacked, redelivered)

    def describe(self) -> str:
        return (f"NATS JetStream {self.names.calls} on {', '.join(self.cfg.servers)} "
                f"(replicas {self.cfg.replicas})")
