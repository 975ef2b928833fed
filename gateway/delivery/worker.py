"""The read loop of one destination: read the spool in order, plan, batch,
send, record, and move the read position.

The read position only moves once every call before it is delivered,
scheduled for a retry or dead-lettered, in one transaction: a crash at any
instant re-sends (at least once), never skips.  Only calls a destination
refuses one by one go to the retries table; while whole batches fail, the
position stays before them (sender.py).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time

from gateway.activity import ActivityFeed
from gateway.delivery.batching import Batcher, Item
from gateway.delivery.planner import Plan, Planner
from gateway.delivery.recorder import Recorder
from gateway.delivery.sender import Sender
from gateway.delivery.stats import Stats
from gateway.loop_share import Pacer
from gateway.plugins import BuiltDestination
from gateway.spool import Ack, DeadLetter, Pending, Record, Spool, StorageFailed

log = logging.getLogger("gateway.delivery")

READ_WINDOW = 5000
YIELD_EVERY = 100  # calls planned between looks at the Pacer's clock
#: seconds between looks at the retries table for entries this worker did not
#: schedule itself (``gateway dlq replay``, a restart); its own retries are
#: sent when they are due, not at the next poll
RETRY_POLL = 1.0
#: retry times a worker remembers; past that, retries wait for the next poll
RETRY_TIMES_MAX = 10_000
#: how a retry entry queued by a replay begins its reason (spool/sqlite_replay.py, dead letters)
REPLAYED = "replayed"
#: seconds between tries at storing an Ack the spool refused (a full disk)
ACK_RETRY_MIN, ACK_RETRY_MAX = 0.1, 2.0


class Worker:
    """Delivers to one destination."""

    def __init__(self, spool: Spool, built: BuiltDestination, feed: ActivityFeed) -> None:
        self.spool = spool
        self.dc = dc = built.config
        self.name = dc.name
        self.dest = built.destination
        self.stats = Stats()
        self.planner = Planner(dc, built.destination, built.transforms)
        self.batcher = Batcher(dc, built.destination)
        self.sender = Sender(dc, built.destination, built.throttle, self.stats)
        self.recorder = Recorder(dc, self.sender, self.stats, feed)
        #: (position it reads after, the read) of the next window, read ahead
        self.prefetch: tuple[int, asyncio.Future[list[Record]]] | None = None
        self.ack_pending: asyncio.Future[None] | None = None
        self.ack_sent = Ack(self.name)  # what ack_pending stores
        #: when the retries this worker scheduled are due (a min-heap)
        self.retry_times: list[float] = []
        #: its last read filled a window: a backlog (loop_share gives it turns)
        self.behind = False
        self.task: asyncio.Task[None] | None = None
        self.position = 0
        self.wakeup = spool.subscribe()

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"deliver:{self.name}")

    async def stop(self, timeout: float) -> None:
        """Finish in-flight sends within ``timeout``; what is cut off stays queued."""
        self.sender.stopping = True
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

    # -- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        last_retry_poll = 0.0
        synced = False
        sender = self.sender
        while not sender.stopping:
            try:
                if not synced:
                    # From the stored cursor: after a failed step, an ack may
                    # not have been stored (its retries and dead letters with
                    # it), so the calls after the cursor are planned again.
                    await self._acked()
                    self.position = await self.spool.cursor(self.name)
                    synced = True
                now = time.time()
                if now < sender.hold_until:
                    await self._sleep(sender.hold_until - now)
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
                if sender.stopping or time.time() < sender.hold_until:
                    continue
                records = await self._read_next()
                if sender.stopping:
                    break
                if records and len(records) < self.batcher.max_calls and self.dc.batch.max_wait > 0:
                    # A partial batch: give more calls a moment to arrive.
                    wait = records[0].received + self.dc.batch.max_wait - time.time()
                    if wait > 0:
                        await asyncio.sleep(min(wait, self.dc.batch.max_wait))
                        records = await self.spool.window(self.name, self.position, READ_WINDOW)
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
        return await self.spool.window(self.name, self.position, READ_WINDOW)

    async def _acked(self) -> None:
        """Wait for the last step's transaction (it runs while the next step
        reads and sends).  One that fails (a full disk) is stored again, the
        same Ack, until it is: answering it by sending the window again would
        deliver every call of it twice, and the cursor could never move."""
        pending, self.ack_pending = self.ack_pending, None
        if pending is None:
            return
        try:
            await pending
            return
        except StorageFailed as e:
            log.warning("%s: could not store what was delivered (%s); storing it again", self.name, e)
        delay = ACK_RETRY_MIN
        while True:
            await asyncio.sleep(delay)
            try:
                await self.spool.ack(self.ack_sent)
            except StorageFailed as e:
                delay = min(ACK_RETRY_MAX, delay * 2)
                log.debug("%s: storing an ack failed again: %s", self.name, e)
                continue
            log.warning("%s: what was delivered is stored; delivery goes on", self.name)
            return

    async def _ack(self, ack: Ack, wake: list[float]) -> None:
        for at in wake:
            self._remember_retry(at)
        await self._acked()
        self.ack_sent = ack
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
        self.behind = False
        self.wakeup.clear()
        try:
            await asyncio.wait_for(self.wakeup.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    # -- one step ---------------------------------------------------------------

    async def _deliver_records(self, records: list[Record]) -> int:
        items: list[Item] = []
        planned: list[tuple[Record, DeadLetter | Plan]] = []  # dead letters and skips
        now = time.time()
        planner, recorder = self.planner, self.recorder
        as_stored = planner.as_stored  # the common case costs no Plan
        pacer = Pacer()
        for i, r in enumerate(records):
            if i and not i % YIELD_EVERY:
                await pacer.pace()
            if as_stored(r.data):
                items.append(Item(r.seq, r.source, r.data, r.data))
                continue
            p = planner.plan(r.data, r.source)
            if p.payload is not None:
                items.append(Item(r.seq, r.source, r.data, p.payload))
            elif p.error is not None:
                planned.append((r, recorder.dead(r, p.error, None, "", 0, now, count=False)))
            else:
                planned.append((r, p))
        if len(records) >= READ_WINDOW:  # more is waiting: read it while this window is sent
            self.prefetch = (records[-1].seq, asyncio.ensure_future(
                self.spool.window(self.name, records[-1].seq, READ_WINDOW)))
        results = await self.sender.send_all(self.batcher.batches(items))
        cut = self.sender.stalled_at(results)
        ack = Ack(self.name, cursor=records[-1].seq if cut is None else cut - 1)
        for r, what in planned:
            if cut is not None and r.seq >= cut:
                continue  # planned again when the worker comes back to it
            if isinstance(what, DeadLetter):
                recorder.count_dead(what)
                ack.dead.append(what)
            else:
                recorder.skipped(r, what.skip_reason, what.refused)
        wake = recorder.record_all(results, ack, cut)
        await self._ack(ack, wake)
        self.position = ack.cursor if ack.cursor is not None else self.position
        return len(records)

    async def _deliver_retries(self, due: list[Pending]) -> int:
        ack = Ack(self.name)
        items: list[Item] = []
        now = time.time()
        pacer = Pacer()
        for i, pend in enumerate(due):
            if i and not i % YIELD_EVERY:
                await pacer.pace()
            if pend.attempts == 0 and pend.reason.startswith(REPLAYED):
                self.stats.replayed += 1
            p = self.planner.plan(pend.data, pend.source)
            if p.payload is not None:
                items.append(Item(pend.seq, pend.source, pend.data, p.payload, pend))
                continue
            ack.done.append(pend.seq)
            if p.error is not None:
                ack.dead.append(self.recorder.dead(pend, p.error, None, "", pend.attempts, now))
            else:
                self.recorder.skipped(pend, p.skip_reason, p.refused)
        wake = self.recorder.record_all(await self.sender.send_all(self.batcher.batches(items)), ack)
        await self._ack(ack, wake)
        return len(due)
