"""What each outcome of a send means for the queue: delivered, scheduled
for a retry (with backoff and ``Retry-After``), kept queued behind a hold,
or dead-lettered with why.  Everything a step decides goes into one ``Ack``,
stored in one transaction."""

from __future__ import annotations

import logging
import time

from gateway.activity import ActivityFeed
from gateway.config import DestinationConfig
from gateway.delivery.batching import Item
from gateway.delivery.planner import message_id_of
from gateway.delivery.sender import Deferred, Sender, Sent
from gateway.delivery.stats import Stats, backoff, reason_label
from gateway.outcomes import BODY_EXCERPT, DELIVERED, Delivered, Failed, Outcome, Paused, Retry
from gateway.spool import Ack, DeadLetter, Pending, Record

log = logging.getLogger("gateway.delivery")


class Recorder:
    """Turns one destination's outcomes into entries of an Ack, and counts them."""

    def __init__(self, dc: DestinationConfig, sender: Sender, stats: Stats, feed: ActivityFeed) -> None:
        self.name = dc.name
        self.policy = dc.retry
        self.sender = sender
        self.stats = stats
        self.feed = feed

    def record_all(self, results: list[Sent], ack: Ack, cut: int | None = None) -> list[float]:
        """Record every outcome (none at or past ``cut`` but deliveries);
        returns when the worker should look at its retries again."""
        now = time.time()
        wake: list[float] = []
        for batch, outcomes in results:
            if outcomes.count(DELIVERED) == len(outcomes):  # the common case, without a call per item
                self.stats.delivered += len(batch)
                ack.done.extend(it.seq for it in batch if it.pending is not None)
                if self.feed.watched:
                    for it in batch:
                        self.feed.call_record("delivered", it.data, destination=self.name, source=it.source)
                continue
            # One backoff a batch: its calls come due together and go out together again.
            delay = backoff(self.policy, max((it.pending.attempts if it.pending else 0) for it in batch) + 1)
            for it, oc in zip(batch, outcomes):
                if cut is not None and it.seq >= cut and not isinstance(oc, Delivered):
                    if isinstance(oc, (Retry, Paused)):
                        self.held(it, oc)
                    continue
                at = self.record(it, oc, ack, now, delay)
                if at is not None:
                    wake.append(at)
        return wake

    def record(self, it: Item, oc: Outcome | Paused | Deferred, ack: Ack, now: float, delay: float) -> float | None:
        """Record one outcome; returns when a retry it scheduled comes due."""
        pend = it.pending
        if isinstance(oc, Delivered):
            self.stats.delivered += 1
            if pend is not None:
                ack.done.append(it.seq)
            if self.feed.watched:
                self.feed.call_record("delivered", it.data, destination=self.name, source=it.source)
            return None
        hold_until = self.sender.hold_until
        if isinstance(oc, Deferred):
            # Not sent: a retry keeps its entry as it is; a new call gets one,
            # due when the hold ends, with no attempt counted.
            at = max(now, hold_until)
            if pend is None:
                ack.retry.append(Pending(it.seq, it.data, it.source, 0, now, at, None, f"deferred: {oc.reason}"))
            return at
        if isinstance(oc, Paused):
            # Not the call's fault: keep it queued, uncounted, behind the pause.
            ack.retry.append(Pending(it.seq, it.data, it.source, pend.attempts if pend else 0,
                                     pend.first_failed if pend else now, hold_until,
                                     oc.status, f"paused: {oc.reason}", oc.body[:BODY_EXCERPT]))
            self.stats.error(f"paused: {oc.reason}", oc.status, oc.body, message_id_of(it.data))
            self._retried(it, f"paused: {oc.reason}", oc.status, oc.body, hold_until)
            return hold_until
        attempts = (pend.attempts if pend else 0) + 1
        first = pend.first_failed if pend else now
        if isinstance(oc, Retry):
            # Give up after *both* the count and the time window, so that a
            # long outage is retried for max_age (RudderStack's rule).
            if attempts >= self.policy.max_attempts and now - first >= self.policy.max_age:
                why = f"gave up after {attempts} attempts over {now - first:.0f}s; last: {oc.reason}"
                if pend is not None:
                    ack.done.append(it.seq)
                ack.dead.append(self.dead(it, why, oc.status, oc.body, attempts, now))
                return None
            if oc.retry_after is not None:
                delay = max(delay, oc.retry_after)
                self.sender.hold(now + oc.retry_after)
            self.stats.retried += 1
            self.stats.error(oc.reason, oc.status, oc.body, message_id_of(it.data))
            ack.retry.append(Pending(it.seq, it.data, it.source, attempts, first, now + delay,
                                     oc.status, oc.reason, oc.body[:BODY_EXCERPT]))
            self._retried(it, oc.reason, oc.status, oc.body, now + delay)
            return now + delay
        assert isinstance(oc, Failed)
        if pend is not None:
            ack.done.append(it.seq)
        ack.dead.append(self.dead(it, oc.reason, oc.status, oc.body, attempts, now))
        return None

    def dead(self, it: Item | Pending | Record, reason: str, status: int | None, body: str, attempts: int, now: float,
             count: bool = True) -> DeadLetter:
        """A dead letter for a call; counted now unless ``count`` is False
        (a planned one is counted once the step knows it stands)."""
        x = DeadLetter(0, self.name, it.seq, message_id_of(it.data), reason, status, body[:BODY_EXCERPT],
                       attempts, now, it.source, it.data)
        if count:
            self.count_dead(x)
        return x

    def count_dead(self, x: DeadLetter) -> None:
        self.stats.count(self.stats.dead, reason_label(x.reason, x.status))
        self.stats.error(x.reason, x.status, x.body, x.message_id)
        log.info("%s: dead letter %s: %s", self.name, x.message_id, x.reason)
        if self.feed.watched:
            self.feed.call_record("dead_lettered", x.data, destination=self.name, source=x.source,
                                  reason=x.reason, status=x.status, excerpt=x.body)

    def skipped(self, it: Item | Pending | Record, reason: str, why: str | None = None) -> None:
        """A call routed away (``why`` says by what) or dropped by a destination transform."""
        self.stats.count(self.stats.skipped, reason)
        if self.feed.watched:
            self.feed.call_record("skipped", it.data, destination=self.name, source=it.source, reason=reason,
                                  why=why or reason)

    def held(self, it: Item, oc: Retry | Paused) -> None:
        """A call of a batch that failed whole: the queue holds before it
        (sender.stalled_at) and sends it again when the hold ends."""
        reason = oc.reason if isinstance(oc, Retry) else f"paused: {oc.reason}"
        self.stats.error(reason, oc.status, oc.body, message_id_of(it.data))
        self._retried(it, reason, oc.status, oc.body, self.sender.hold_until)

    def _retried(self, it: Item, reason: str, status: int | None, body: str, next_at: float) -> None:
        if self.feed.watched:
            # A hold that is already over means the next attempt is now, never before the record.
            at = time.time()
            self.feed.call_record("retried", it.data, destination=self.name, source=it.source, reason=reason,
                                  status=status, excerpt=body[:BODY_EXCERPT], at=at, next_attempt=max(next_at, at))
