"""The last steps every entry point shares (the Pipelines API, pixels,
Customer.io's Track API): prepare calls within ingest's share of the loop,
append them to the spool, count and publish what happened."""

from __future__ import annotations

from time import perf_counter
from typing import Any, Callable

from gateway.activity import ActivityFeed
from gateway.ingest import Prepared
from gateway.loop_share import IngestShare
from gateway.metrics import Counters
from gateway.spool import Spool, SpoolFull, StorageFailed


class Intake:
    """One per app; entry points call it, then answer as their protocol does."""

    def __init__(self, share: IngestShare, spool: Spool, counters: Counters, feed: ActivityFeed) -> None:
        self.share = share
        self.spool = spool
        self.counters = counters
        self.feed = feed

    async def prepare(self, make: Callable[..., Prepared], *args: Any) -> Prepared:
        """``make(*args)`` (an Ingest.prepare*) within ingest's share of the loop:
        behind a backlog, requests wait their turn in arrival order."""
        share = self.share
        if share.full():
            await share.wait()
        started = perf_counter()
        try:
            return make(*args)
        finally:
            share.spend(perf_counter() - started)

    async def store(self, prepared: Prepared, mode: str = "lax") -> None:
        """Count what was turned away, append the rows, count what was stored
        (or left out as a duplicate).  SpoolFull and StorageFailed pass on
        (counted as ``overload``): the caller answers them."""
        counters, feed = self.counters, self.feed
        source = prepared.source.name
        for r in prepared.rejections:
            counters.bump(counters.rejected, r.reason)
        for reason in prepared.dropped:
            counters.bump(counters.dropped, reason)
        if feed.watched:
            for r in prepared.rejections:
                feed.publish("rejected", source=source, reason=r.reason, field=r.field, message=r.message,
                             index=r.index, mode=mode)
            for reason in prepared.dropped:
                feed.publish("dropped", source=source, reason=reason)
        rows = prepared.rows
        try:
            left_out = await self.spool.append(source, rows, prepared.ids)
        except (SpoolFull, StorageFailed) as e:
            counters.bump(counters.rejected, "overload", len(rows))
            if feed.watched:
                feed.publish("rejected", source=source, reason="overload", message=str(e), status=503,
                             calls=len(rows))
            raise
        if left_out or prepared.duplicates:
            counters.bump(counters.deduplicated, source, left_out + prepared.duplicates)
        counters.bump(counters.accepted, source, len(rows) - left_out)
        if feed.watched:
            for row in rows:
                feed.call_record("accepted", row, source=source)
