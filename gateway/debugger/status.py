"""What the status panel shows: each destination's backlog, delivery rate
over the last minutes, last error and pause; and the dead letters, read and
replayed through the spool's ``DeadLetterStore`` (what ``gateway dlq`` uses).

The dead-letter store is a blocking API: its functions here are meant for
``run_in_executor``, never for the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, AsyncIterator

import msgspec

from gateway.activity import CALL_EXCERPT
from gateway.config import StorageConfig
from gateway.delivery import Worker
from gateway.spool import DeadLetter, open_dead_letters

#: seconds between samples of the delivery counters
SAMPLE_EVERY = 5.0
#: samples kept: ten minutes of them
SAMPLES = 120
#: dead letters the page lists (the newest); the total is said beside them
DEAD_LETTERS_SHOWN = 200


class RateHistory:
    """Delivered and failed counts of every destination, sampled every
    SAMPLE_EVERY seconds from their Stats (a few ints: nothing to measure)."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.samples: deque[tuple[float, dict[str, tuple[int, int]]]] = deque(maxlen=SAMPLES + 1)

    def counts(self) -> dict[str, tuple[int, int]]:
        return {w.name: (w.stats.delivered, w.stats.retried + sum(w.stats.dead.values())) for w in self.workers}

    def sample(self, now: float | None = None) -> None:
        self.samples.append((time.time() if now is None else now, self.counts()))

    def series(self, name: str, now: float | None = None) -> list[list[float]]:
        """``[end time, delivered a second, failed a second]`` per interval,
        oldest first; the last one runs from the newest sample to now."""
        now = time.time() if now is None else now
        points = [(t, c[name]) for t, c in self.samples if name in c]
        current = self.counts().get(name)
        if current is not None and (not points or now - points[-1][0] >= 1.0):
            points.append((now, current))
        out = []
        for (t0, (d0, f0)), (t1, (d1, f1)) in zip(points, points[1:]):
            span = max(t1 - t0, 1e-3)
            out.append([round(t1, 3), round((d1 - d0) / span, 3), round((f1 - f0) / span, 3)])
        return out

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_EVERY)

    async def running(self, app: object) -> AsyncIterator[None]:
        """A ``cleanup_ctx``: sample while the app runs."""
        task = asyncio.create_task(self.run(), name="debugger-rates")
        try:
            yield
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


def destination_status(w: Worker, history: RateHistory, now: float) -> dict[str, Any]:
    """One destination's card: nothing of its settings (they hold its credentials)."""
    s = w.stats
    hold = w.sender.hold_until
    return {
        "name": w.name,
        "type": w.dc.type,
        "enabled": w.dc.enabled,
        "running": w.task is not None and not w.task.done(),
        "paused": s.paused,
        "held_until": hold if hold > now else None,
        "backlog": s.backlog,
        "retry_backlog": s.retry_backlog,
        "oldest_age": round(now - s.oldest, 3) if s.oldest is not None else None,
        "delivered": s.delivered,
        "retried": s.retried,
        "dead": sum(s.dead.values()),
        "skipped": sum(s.skipped.values()),
        "last_error": msgspec.to_builtins(s.last_error) if s.last_error is not None else None,
        "rate": history.series(w.name, now),
    }


def letter(x: DeadLetter) -> dict[str, Any]:
    """A dead letter for the page, its call cut at CALL_EXCERPT bytes."""
    out: dict[str, Any] = {"id": x.id, "destination": x.destination, "messageId": x.message_id, "reason": x.reason,
                           "status": x.status, "excerpt": x.body, "attempts": x.attempts, "at": x.at,
                           "source": x.source, "call": x.data[:CALL_EXCERPT].decode("utf-8", "replace")}
    if len(x.data) > CALL_EXCERPT:
        out["truncated"] = len(x.data)
    return out


def list_dead_letters(storage: StorageConfig, shown: int = DEAD_LETTERS_SHOWN) -> dict[str, Any]:
    """The newest ``shown`` dead letters, newest first, and how many there are (blocking)."""
    try:
        store = open_dead_letters(storage)
    except FileNotFoundError:
        return {"total": 0, "letters": []}
    try:
        letters = store.list()
    finally:
        store.close()
    return {"total": len(letters), "letters": [letter(x) for x in reversed(letters[-shown:])]}


def replay_dead_letters(storage: StorageConfig, destination: str | None,
                        message_id: str | None) -> list[DeadLetter]:
    """What ``gateway dlq replay --destination D --id M`` does (blocking)."""
    try:
        store = open_dead_letters(storage)
    except FileNotFoundError:
        return []
    try:
        return store.replay(destination, message_id)
    finally:
        store.close()
