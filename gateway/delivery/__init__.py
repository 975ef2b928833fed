"""Delivery: one worker per destination reads the spool in order, routes,
transforms, maps, batches and sends, and records every outcome.

Workers share nothing but the spool, so a destination that is slow or down
holds back neither ingest nor the others; its backlog waits on disk.  The
jobs are split by module: ``planner`` (what a call becomes), ``batching``,
``sender`` (in flight, holds, pauses), ``recorder`` (outcomes into the
spool's Ack), ``worker`` (the read loop), ``stats``.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.activity import ActivityFeed
from gateway.delivery.worker import Worker
from gateway.plugins import Built
from gateway.spool import Spool, StorageFailed

log = logging.getLogger("gateway.delivery")

HOUSEKEEPING_EVERY = 2.0  # seconds between purges of what every destination read


class Delivery:
    """All workers of one app, plus the spool's housekeeping."""

    def __init__(self, spool: Spool, built: Built, retention: float, feed: ActivityFeed) -> None:
        self.spool = spool
        self.workers = [Worker(spool, b, feed) for b in built.destinations]
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
        failing = False
        while True:
            await asyncio.sleep(HOUSEKEEPING_EVERY)
            try:
                await self.spool.purge(names, self.retention)
                for w in self.workers:
                    w.stats.backlog, w.stats.retry_backlog, w.stats.oldest = await self.spool.stats(w.name)
            except StorageFailed as e:  # a full disk: said once, tried again every turn
                if not failing:
                    log.warning("spool housekeeping fails (%s); trying again every %.0fs", e, HOUSEKEEPING_EVERY)
                failing = True
                continue
            except Exception:  # noqa: BLE001
                log.exception("spool housekeeping failed")
                continue
            if failing:
                log.warning("spool housekeeping works again")
                failing = False

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


__all__ = ["Delivery", "Worker"]
