"""Sending batches to one destination: a bounded number in flight, the
destination's holds (``Retry-After``, a pause after refused credentials,
backoff while whole batches fail) and the reading of what ``send`` returned
or raised.

A batch that fails whole means the destination is down, not its calls: the
queue holds at that batch (head of line) and waits, so the backlog stays in
the spool, in order, costing nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import msgspec

from gateway.config import DestinationConfig
from gateway.delivery.batching import Item
from gateway.delivery.stats import Stats, backoff
from gateway.http_client import Throttle
from gateway.outcomes import Paused, Retry
from gateway.plugin_classes import Destination
from gateway.spool import Pending

log = logging.getLogger("gateway.delivery")

PAUSE_MIN, PAUSE_MAX = 5.0, 300.0


class Deferred(msgspec.Struct, frozen=True):
    """Not sent, through no fault of the call: the destination is on hold
    (``Retry-After``, ``Paused``) or the worker is stopping.  The call stays
    queued and the attempt is not counted."""

    reason: str


Sent = tuple[list[Item], list[Any]]  # a batch and one Outcome | Paused | Deferred per item


class Sender:
    """Sends one destination's batches and keeps its holds."""

    def __init__(self, dc: DestinationConfig, dest: Destination, throttle: Throttle, stats: Stats) -> None:
        self.name = dc.name
        self.dc = dc
        self.dest = dest
        self.throttle = throttle
        self.stats = stats
        self.sem = asyncio.Semaphore(dc.concurrency)
        #: nothing is sent before this time (Retry-After, a pause, backoff)
        self.hold_until = 0.0
        self.pause_for = PAUSE_MIN
        #: the head of the queue while whole batches fail: (position, since, attempts)
        self.stall: tuple[int, float, int] | None = None
        self.stopping = False

    def hold(self, until: float) -> None:
        self.hold_until = max(self.hold_until, until)

    def held(self) -> Deferred | None:
        """Why nothing may be sent now, if something forbids it."""
        if self.stopping:
            return Deferred("the gateway is stopping")
        if time.time() < self.hold_until:
            return Deferred("the destination is on hold")
        return None

    async def send_all(self, batches: list[list[Item]]) -> list[Sent]:
        if not batches:
            return []
        return list(await asyncio.gather(*(self.send(b) for b in batches)))

    async def send(self, batch: list[Item]) -> Sent:
        async with self.sem:
            # Batches wait here for a turn; by then a batch before them may
            # have put the destination on hold (Retry-After, Paused) or
            # SIGTERM may have come: those wait, queued, and cost no attempt.
            if (held := self.held()) is not None:
                return batch, [held] * len(batch)
            await self.throttle.ready()  # the request itself takes the turn
            if (held := self.held()) is not None:
                return batch, [held] * len(batch)
            payloads = [it.payload for it in batch]
            try:
                async with asyncio.timeout(self.dc.timeout):
                    outcomes: list[Any] = list(await self.dest.send(payloads))
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"send returned {len(outcomes)} outcomes for {len(batch)} calls")
                for oc in outcomes:
                    if isinstance(oc, Retry) and oc.retry_after is not None:
                        # Honoured at once, so batches waiting for a turn hold too.
                        self.hold(time.time() + oc.retry_after)
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
            except Exception as e:  # noqa: BLE001 - plugin bugs retry like network errors
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
        self.stats.paused = True
        self.pause_for = min(PAUSE_MAX, self.pause_for * 2)

    def stalled_at(self, results: list[Sent]) -> int | None:
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
                self.hold(now + delay)
                self.stats.retried += len(outcomes)
                log.warning("%s: batch failed (%s); holding the queue for %.1fs (attempt %d)",
                            self.name, first.reason, delay, attempts)
            self.stall = (pos, since, attempts)
            return head
        self.stall = None
        return None



