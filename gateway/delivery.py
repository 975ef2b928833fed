"""Delivery: one worker per destination reads the spool in order, routes,
transforms, maps, batches and sends, and records every outcome.

Workers share nothing but the spool, so a destination that is slow or down
holds back neither ingest nor the others; its backlog waits on disk.  The
read position only moves once every call before it is delivered, scheduled
for a retry or dead-lettered, in one transaction: a crash at any instant
re-sends (at least once), never skips.

When a whole batch fails (network error, 5xx, 429, a paused destination),
the destination is down, not the calls: the read position stays before that
batch and the worker waits (backoff, Retry-After), so the backlog stays in
the spool, in order, costing nothing.  Only calls a destination refuses one
by one go to the retries table.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from typing import Any, Callable

import aiohttp
import msgspec

from gateway.config import DestinationConfig, RetryConfig
from gateway.destination import (BODY_EXCERPT, DELIVERED, Delivered, Destination, Failed, MappingError, Outcome,
                                 Paused, Retry, Transform)
from gateway.events import call_decoder
from gateway.routing import Route
from gateway.share import Pacer
from gateway.spool import Ack, DeadLetter, Pending, Record

log = logging.getLogger(__name__)

READ_WINDOW = 5000
YIELD_EVERY = 100  # calls planned between looks at the Pacer's clock
#: seconds between looks at the retries table for entries this worker did not
#: schedule itself (``gateway dlq replay``, a restart); its own retries are
#: sent when they are due, not at the next poll
RETRY_POLL = 1.0
#: retry times a worker remembers; past that, retries wait for the next poll
RETRY_TIMES_MAX = 10_000
PAUSE_MIN, PAUSE_MAX = 5.0, 300.0


class Plan(msgspec.Struct):
    """What one call becomes for one destination."""

    payload: bytes | None = None
    refused: str | None = None  # routing said no (not an error)
    dropped: str | None = None  # a transform dropped it
    error: str | None = None  # permanent: goes to the dead-letter store
    call: dict[str, Any] | None = None


class RouteView(msgspec.Struct):
    """The fields routing reads; msgspec skips the rest of the call unparsed."""

    type: Any = None
    event: Any = None
    integrations: Any = None
    messageId: Any = None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


route_view_decoder = msgspec.json.Decoder(RouteView)


class TokenBucket:
    """At most ``rate`` requests per ``per`` seconds, with bursts of ``rate``."""

    def __init__(self, rate: float, per: float) -> None:
        self.capacity = max(1.0, rate)
        self.fill = rate / per
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.fill)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.fill)


def backoff(policy: RetryConfig, attempts: int) -> float:
    """Exponential backoff with full jitter (AWS's "full jitter")."""
    return random.uniform(0, min(policy.backoff_cap, policy.backoff_base * 2 ** max(0, attempts - 1)))


class Deferred(msgspec.Struct, frozen=True):
    """Not sent, through no fault of the call: the destination is on hold
    (``Retry-After``, ``Paused``) or the worker is stopping.  The call stays
    queued and the attempt is not counted."""

    reason: str


class Item(msgspec.Struct):
    """A call on its way out: a new record, or a retry of one."""

    seq: int
    source: str
    data: bytes
    payload: bytes
    pending: Pending | None = None


class Stats:
    """Counters a worker keeps; metrics.py reads them (the core has no
    dependency on the metrics library here)."""

    def __init__(self) -> None:
        self.delivered = 0
        self.retried = 0
        self.dead: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.paused = False
        self.backlog = 0
        self.retry_backlog = 0
        self.oldest: float | None = None

    def count(self, table: dict[str, int], key: str, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n


def reason_label(reason: str, status: int | None = None) -> str:
    """A bounded label for metrics: ``http_<status>``, ``retries_exhausted``,
    or the reason's code (``LIMIT_EXCEEDED``, ``MAPPING_FAILED``)."""
    if reason.startswith("gave up after"):
        return "retries_exhausted"
    if status is not None:
        return f"http_{status}"
    head = reason.split(":", 1)[0].split(" ", 1)[0]
    return head[:40] or "unknown"


class Worker:
    """Delivers to one destination."""

    def __init__(self, spool: Any, dc: DestinationConfig, dest: Destination, transforms: list[Transform]) -> None:
        self.spool = spool
        self.dc = dc
        self.dest = dest
        self.name = dc.name
        self.transforms = transforms
        self.route = Route([dc.name, *dc.aliases, *dest.aliases], dc.filter)
        self.passthrough = dest.forwards_calls and not transforms
        lim = dest.limits
        self.max_calls = max(1, min(dc.batch.max_calls or lim.max_batch_calls, lim.max_batch_calls))
        self.max_bytes = min(dc.batch.max_bytes or lim.max_batch_bytes, lim.max_batch_bytes)
        self.max_call = min(lim.max_call_bytes, self.max_bytes - lim.batch_overhead)
        self.overhead = lim.batch_overhead
        rl = dc.rate_limit
        self.bucket = TokenBucket(rl.requests, rl.per_seconds) if rl else TokenBucket(lim.rate_requests, lim.rate_period)
        self.sem = asyncio.Semaphore(dc.concurrency)
        self.stats = Stats()
        self.hold_until = 0.0
        self.pause_for = PAUSE_MIN
        #: the head of the queue while whole batches fail: (position, since, attempts)
        self.stall: tuple[int, float, int] | None = None
        #: (position it reads after, the read) of the next window, read ahead
        self.prefetch: tuple[int, asyncio.Future[list[Record]]] | None = None
        self.ack_pending: asyncio.Future[None] | None = None
        dest.throttle = self.bucket.take  # for a send that makes more than one request
        #: when the retries this worker scheduled are due (a min-heap)
        self.retry_times: list[float] = []
        self.stopping = False
        #: its last read filled a window: a backlog (share.Turns gives it turns)
        self.behind = False
        self.task: asyncio.Task[None] | None = None
        self.position = 0
        self.wakeup: asyncio.Event | None = None
        self.on_alert: Callable[[str, str], None] = lambda name, reason: None

    # -- planning (also used by `gateway explain`) -------------------------

    def as_stored(self, data: bytes) -> bool:
        """Whether the stored bytes are the payload with nothing to read: a
        destination that forwards calls, no route that could refuse it, in size."""
        return (self.passthrough and self.route.open and len(data) <= self.max_call
                and b'"integrations"' not in data)

    def plan(self, data: bytes | dict[str, Any], source: str) -> Plan:
        try:
            if self.passthrough and isinstance(data, bytes):
                # The destination sends calls as stored: read only what routing
                # needs, and nothing at all when nothing could route it away.
                if self.as_stored(data):
                    return Plan(payload=data)
                view = route_view_decoder.decode(data)
                refused = self.route.refuse(view, source)  # type: ignore[arg-type]
                if refused is not None:
                    return Plan(refused=refused, call={"messageId": view.messageId})
                if len(data) > self.max_call:
                    return Plan(error=f"LIMIT_EXCEEDED: payload is {len(data)} bytes; "
                                      f"the destination takes {self.max_call} a call",
                                call={"messageId": view.messageId})
                return Plan(payload=data, call={"messageId": view.messageId})
            call = call_decoder.decode(data) if isinstance(data, bytes) else data
        except msgspec.DecodeError as e:  # only a damaged spool row could do this
            return Plan(error=f"UNREADABLE: {e}")
        refused = self.route.refuse(call, source)
        if refused is not None:
            return Plan(refused=refused, call=call)
        for t in self.transforms:
            out = t.apply(call)
            if out is None:
                return Plan(dropped=t.drop_reason, call=call)
            call = out
        try:
            payload = self.dest.prepare(call)
        except MappingError as e:
            return Plan(error=f"{e.code}: {e.message}", call=call)
        except Exception as e:  # noqa: BLE001 - a plugin bug must not stop the queue
            log.exception("%s: prepare failed", self.name)
            return Plan(error=f"MAPPING_FAILED: {type(e).__name__}: {e}", call=call)
        if len(payload) > self.max_call:
            return Plan(error=f"LIMIT_EXCEEDED: payload is {len(payload)} bytes; "
                              f"the destination takes {self.max_call} a call", call=call)
        return Plan(payload=payload, call=call)

    # -- the loop ----------------------------------------------------------

    def start(self) -> None:
        self.wakeup = self.spool.subscribe()
        self.task = asyncio.create_task(self.run(), name=f"deliver:{self.name}")

    async def stop(self, timeout: float) -> None:
        """Finish in-flight sends within ``timeout``; what is cut off stays queued."""
        self.stopping = True
        if self.wakeup is not None:
            self.wakeup.set()
        if self.task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except asyncio.TimeoutError:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        except Exception:  # noqa: BLE001
            log.exception("%s: worker failed", self.name)

    async def run(self) -> None:
        last_retry_poll = 0.0
        synced = False
        while not self.stopping:
            try:
                if not synced:
                    # From the stored cursor: after a failed step, an ack may
                    # not have been stored (its retries and dead letters with
                    # it), so the calls after the cursor are planned again.
                    await self._acked()
                    self.position = await self.spool.cursor(self.name)
                    synced = True
                now = time.time()
                if now < self.hold_until:
                    await self._sleep(self.hold_until - now)
                    continue
                did = 0
                if self._retry_due(now) or now - last_retry_poll >= RETRY_POLL:
                    last_retry_poll = now
                    await self._acked()  # what the last step finished must not come due again
                    due = await self.spool.due(self.name, now, READ_WINDOW)
                    if len(due) >= READ_WINDOW:
                        self._remember_retry(now)  # more are due: look again at once
                    if due:
                        did += await self._deliver_retries(due)
                if self.stopping or time.time() < self.hold_until:
                    continue
                records = await self._read_next()
                if self.stopping:
                    break
                if records and len(records) < self.max_calls and self.dc.batch.max_wait > 0:
                    # A partial batch: give more calls a moment to arrive.
                    wait = records[0].received + self.dc.batch.max_wait - time.time()
                    if wait > 0:
                        await asyncio.sleep(min(wait, self.dc.batch.max_wait))
                        records = await self.spool.read(self.position, READ_WINDOW)
                self.behind = len(records) >= READ_WINDOW
                if records:
                    did += await self._deliver_records(records)
                if not did:
                    await self._sleep(self._idle_for())
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - storage trouble: wait and go on
                log.exception("%s: delivery step failed; trying again", self.name)
                self.prefetch = None
                synced = False
                await self._sleep(1.0)  # which also marks it not behind
        self.behind = False
        await self._acked()

    async def _read_next(self) -> list[Record]:
        """The window after the read position: read ahead while the last one
        was being sent, or now."""
        ahead, self.prefetch = self.prefetch, None
        if ahead is not None and ahead[0] == self.position:
            return await ahead[1]
        return await self.spool.read(self.position, READ_WINDOW)

    async def _acked(self) -> None:
        """Wait for the last step's transaction (it runs while the next step
        reads and sends)."""
        pending, self.ack_pending = self.ack_pending, None
        if pending is not None:
            await pending

    async def _ack(self, ack: Ack) -> None:
        await self._acked()
        self.ack_pending = asyncio.ensure_future(self.spool.ack(ack))

    def _retry_due(self, now: float) -> bool:
        """Whether a retry this worker scheduled is due (forgetting those that are)."""
        due = False
        while self.retry_times and self.retry_times[0] <= now:
            heapq.heappop(self.retry_times)
            due = True
        return due

    def _remember_retry(self, at: float) -> None:
        if len(self.retry_times) < RETRY_TIMES_MAX:
            heapq.heappush(self.retry_times, at)

    def _idle_for(self) -> float:
        """Seconds to wait for new calls: until the next retry, RETRY_POLL at most."""
        if self.retry_times:
            return max(0.0, min(RETRY_POLL, self.retry_times[0] - time.time()))
        return RETRY_POLL

    async def _sleep(self, seconds: float) -> None:
        assert self.wakeup is not None
        self.behind = False
        self.wakeup.clear()
        try:
            await asyncio.wait_for(self.wakeup.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    # -- one step ------------------------------------------------------------

    async def _deliver_records(self, records: list[Record]) -> int:
        items: list[Item] = []
        planned: list[tuple[int, DeadLetter | str]] = []  # dead letters and skips, by position
        now = time.time()
        as_stored = self.as_stored  # the common case costs no Plan
        pacer = Pacer()
        for i, r in enumerate(records):
            if i and not i % YIELD_EVERY:
                await pacer.pace()
            if as_stored(r.data):
                items.append(Item(r.seq, r.source, r.data, r.data))
                continue
            p = self.plan(r.data, r.source)
            if p.payload is not None:
                items.append(Item(r.seq, r.source, r.data, p.payload))
            elif p.error is not None:
                planned.append((r.seq, self._dead(r.seq, r.source, r.data, p.error, None, "", 0, now, False)))
            else:
                planned.append((r.seq, "routing" if p.refused else p.dropped or "dropped"))
        if len(records) >= READ_WINDOW:  # more is waiting: read it while this window is sent
            self.prefetch = (records[-1].seq, asyncio.ensure_future(self.spool.read(records[-1].seq, READ_WINDOW)))
        results = await self._send_batches(items)
        cut = self._stalled_at(results)
        ack = Ack(self.name, cursor=records[-1].seq if cut is None else cut - 1)
        for seq, what in planned:
            if cut is not None and seq >= cut:
                continue  # planned again when the worker comes back to it
            if isinstance(what, DeadLetter):
                self._count_dead(what)
                ack.dead.append(what)
            else:
                self.stats.count(self.stats.skipped, what)
        self._record_all(results, ack, cut)
        await self._ack(ack)
        self.position = ack.cursor if ack.cursor is not None else self.position
        return len(records)

    def _stalled_at(self, results: list[tuple[list[Item], list[Any]]]) -> int | None:
        """The position of the first batch that failed whole (the destination,
        not its calls), after which nothing is recorded; None when none did or
        when the head has been retried past the retry policy (then its calls
        are dead-lettered one by one)."""
        now = time.time()
        for batch, outcomes in results:
            if not outcomes or not all(isinstance(o, (Retry, Paused, Deferred)) for o in outcomes):
                continue
            head = batch[0].seq
            first = next((o for o in outcomes if isinstance(o, Retry)), None)
            pos, since, attempts = self.stall if self.stall and self.stall[0] == head else (head, now, 0)
            if first is not None:
                attempts += 1
                policy = self.dc.retry
                if attempts >= policy.max_attempts and now - since >= policy.max_age:
                    # Past the policy: the calls take the per-call path, which
                    # dead-letters them with these counts.
                    self.stall = None
                    for it in batch:
                        it.pending = Pending(it.seq, it.data, it.source, attempts - 1, since, now)
                    return None
                delay = backoff(policy, attempts)
                if first.retry_after is not None:
                    delay = max(delay, first.retry_after)
                self.hold_until = max(self.hold_until, now + delay)
                self.stats.retried += len(outcomes)
                log.warning("%s: batch failed (%s); holding the queue for %.1fs (attempt %d)",
                            self.name, first.reason, delay, attempts)
            self.stall = (pos, since, attempts)
            return head
        self.stall = None
        return None

    async def _deliver_retries(self, due: list[Pending]) -> int:
        ack = Ack(self.name)
        items: list[Item] = []
        now = time.time()
        pacer = Pacer()
        for i, pend in enumerate(due):
            if i and not i % YIELD_EVERY:
                await pacer.pace()
            p = self.plan(pend.data, pend.source)
            if p.payload is not None:
                items.append(Item(pend.seq, pend.source, pend.data, p.payload, pend))
                continue
            ack.done.append(pend.seq)
            if p.error is not None:
                ack.dead.append(self._dead(pend.seq, pend.source, pend.data, p.error,
                                           None, "", pend.attempts, now))
            else:
                self.stats.count(self.stats.skipped, "routing" if p.refused else p.dropped or "dropped")
        self._record_all(await self._send_batches(items), ack)
        await self._ack(ack)
        return len(due)

    def _batches(self, items: list[Item]) -> list[list[Item]]:
        out: list[list[Item]] = []
        cur: list[Item] = []
        size = self.overhead
        for it in items:
            n = len(it.payload) + (1 if cur else 0)
            if cur and (len(cur) >= self.max_calls or size + n > self.max_bytes):
                out.append(cur)
                cur, size, n = [], self.overhead, len(it.payload)
            cur.append(it)
            size += n
        if cur:
            out.append(cur)
        return out

    async def _send_batches(self, items: list[Item]) -> list[tuple[list[Item], list[Any]]]:
        if not items:
            return []
        return list(await asyncio.gather(*(self._send(b) for b in self._batches(items))))

    def _record_all(self, results: list[tuple[list[Item], list[Any]]], ack: Ack, cut: int | None = None) -> None:
        now = time.time()
        for batch, outcomes in results:
            if outcomes.count(DELIVERED) == len(outcomes):  # the common case, without a call per item
                self.stats.delivered += len(batch)
                ack.done.extend(it.seq for it in batch if it.pending is not None)
                continue
            # One backoff a batch: its calls come due together and go out together again.
            delay = backoff(self.dc.retry, max((it.pending.attempts if it.pending else 0) for it in batch) + 1)
            for it, oc in zip(batch, outcomes):
                if cut is not None and it.seq >= cut and not isinstance(oc, Delivered):
                    continue
                self._record(it, oc, ack, now, delay)

    def _held(self) -> Deferred | None:
        """Why nothing may be sent now, if something forbids it."""
        if self.stopping:
            return Deferred("the gateway is stopping")
        if time.time() < self.hold_until:
            return Deferred("the destination is on hold")
        return None

    async def _send(self, batch: list[Item]) -> tuple[list[Item], list[Outcome | Paused | Deferred]]:
        async with self.sem:
            # Batches wait here for a turn; by then a batch before them may
            # have put the destination on hold (Retry-After, Paused) or
            # SIGTERM may have come: those wait, queued, and cost no attempt.
            if (held := self._held()) is not None:
                return batch, [held] * len(batch)
            await self.bucket.take()
            if (held := self._held()) is not None:
                return batch, [held] * len(batch)
            payloads = [it.payload for it in batch]
            try:
                async with asyncio.timeout(self.dc.timeout):
                    outcomes: list[Outcome | Paused | Deferred] = list(await self.dest.send(payloads))
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"send returned {len(outcomes)} outcomes for {len(batch)} calls")
                for oc in outcomes:
                    if isinstance(oc, Retry) and oc.retry_after is not None:
                        # Honoured at once, so batches waiting for a turn hold too.
                        self.hold_until = max(self.hold_until, time.time() + oc.retry_after)
                self.stats.count(self.stats.requests, "sent")
                if self.stats.paused:
                    self.stats.paused = False
                    self.pause_for = PAUSE_MIN
                    log.warning("%s: destination accepts calls again", self.name)
            except Paused as p:
                self._pause(p)
                outcomes = [p] * len(batch)
            except (asyncio.TimeoutError, OSError, aiohttp.ClientError) as e:
                self.stats.count(self.stats.requests, "network_error")
                reason = f"network error: {type(e).__name__}: {e}".rstrip(": ")
                outcomes = [Retry(reason)] * len(batch)
            except Exception as e:  # noqa: BLE001 - aiohttp.ClientError and plugin bugs alike
                self.stats.count(self.stats.requests, "error")
                log.warning("%s: send failed: %s: %s", self.name, type(e).__name__, e)
                outcomes = [Retry(f"send failed: {type(e).__name__}: {e}")] * len(batch)
            return batch, outcomes

    def _pause(self, p: Paused) -> None:
        self.hold_until = time.time() + self.pause_for
        if not self.stats.paused:
            log.error("%s: destination paused (%s, HTTP %s): fix the destination's settings; "
                      "calls stay queued and are retried every %.0fs at most",
                      self.name, p.reason, p.status, PAUSE_MAX)
            self.on_alert(self.name, p.reason)
        self.stats.paused = True
        self.pause_for = min(PAUSE_MAX, self.pause_for * 2)

    def _record(self, it: Item, oc: Outcome | Paused | Deferred, ack: Ack, now: float, delay: float) -> None:
        pend = it.pending
        if isinstance(oc, Delivered):
            self.stats.delivered += 1
            if pend is not None:
                ack.done.append(it.seq)
            return
        if isinstance(oc, Deferred):
            # Not sent: a retry keeps its entry as it is; a new call gets one,
            # due when the hold ends, with no attempt counted.
            at = max(now, self.hold_until)
            self._remember_retry(at)
            if pend is None:
                ack.retry.append(Pending(it.seq, it.data, it.source, 0, now, at, None, f"deferred: {oc.reason}"))
            return
        if isinstance(oc, Paused):
            # Not the call's fault: keep it queued, uncounted, behind the pause.
            ack.retry.append(Pending(it.seq, it.data, it.source, pend.attempts if pend else 0,
                                     pend.first_failed if pend else now, self.hold_until,
                                     oc.status, f"paused: {oc.reason}", oc.body[:BODY_EXCERPT]))
            self._remember_retry(self.hold_until)
            return
        attempts = (pend.attempts if pend else 0) + 1
        first = pend.first_failed if pend else now
        if isinstance(oc, Retry):
            policy = self.dc.retry
            # DESIGN.md: give up after *both* the count and the time window,
            # so that a long outage is retried for max_age (RudderStack's rule).
            if attempts >= policy.max_attempts and now - first >= policy.max_age:
                why = (f"gave up after {attempts} attempts over {now - first:.0f}s; last: {oc.reason}")
                if pend is not None:
                    ack.done.append(it.seq)
                ack.dead.append(self._dead(it.seq, it.source, it.data, why, oc.status, oc.body,
                                           attempts, now))
                return
            if oc.retry_after is not None:
                delay = max(delay, oc.retry_after)
                self.hold_until = max(self.hold_until, now + oc.retry_after)
            self.stats.retried += 1
            ack.retry.append(Pending(it.seq, it.data, it.source, attempts, first, now + delay,
                                     oc.status, oc.reason, oc.body[:BODY_EXCERPT]))
            self._remember_retry(now + delay)
            return
        assert isinstance(oc, Failed)
        if pend is not None:
            ack.done.append(it.seq)
        ack.dead.append(self._dead(it.seq, it.source, it.data, oc.reason, oc.status, oc.body,
                                   attempts, now))

    def _dead(self, seq: int, source: str, data: bytes, reason: str, status: int | None,
              body: str, attempts: int, now: float, count: bool = True) -> DeadLetter:
        x = DeadLetter(0, self.name, seq, _message_id(data), reason, status, body[:BODY_EXCERPT], attempts, now,
                       source, data)
        if count:
            self._count_dead(x)
        return x

    def _count_dead(self, x: DeadLetter) -> None:
        self.stats.count(self.stats.dead, reason_label(x.reason, x.status))
        log.info("%s: dead letter %s: %s", self.name, x.message_id, x.reason)


def _message_id(data: bytes) -> str:
    try:
        mid = route_view_decoder.decode(data).messageId
    except msgspec.DecodeError:
        return ""
    return str(mid) if mid is not None else ""


class Delivery:
    """All workers of one app, plus the spool's housekeeping."""

    def __init__(self, spool: Any, workers: list[Worker], retention: float) -> None:
        self.spool = spool
        self.workers = workers
        self.retention = retention
        self._purger: asyncio.Task[None] | None = None

    def behind(self) -> bool:
        """Whether a destination that is up has a backlog to work through."""
        return any(w.behind for w in self.workers)

    def start(self) -> None:
        for w in self.workers:
            if w.dc.enabled:
                w.start()
        self._purger = asyncio.create_task(self._purge_loop(), name="spool-purge")

    async def _purge_loop(self) -> None:
        names = [w.name for w in self.workers if w.dc.enabled]
        while True:
            await asyncio.sleep(2.0)
            try:
                await self.spool.purge(names, self.retention)
                for w in self.workers:
                    w.stats.backlog, w.stats.retry_backlog, w.stats.oldest = await self.spool.stats(w.name)
            except Exception:  # noqa: BLE001
                log.exception("spool housekeeping failed")

    async def stop(self, timeout: float) -> None:
        if self._purger is not None:
            self._purger.cancel()
            try:
                await self._purger
            except asyncio.CancelledError:
                pass
        await asyncio.gather(*(w.stop(timeout) for w in self.workers))
        for w in self.workers:
            try:
                await w.dest.close()
            except Exception:  # noqa: BLE001
                log.exception("%s: close failed", w.name)
