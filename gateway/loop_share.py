"""How ingest and delivery share the event loop's thread.

Both run on one loop, and the loop runs every ready callback of a turn
before it looks for I/O again, so each step of a send (the request out, the
answer in) waits for a whole turn.  Under full load a turn held the prepare
work of every ready request (30 ms with batches of 100), and a destination
with 4 batches in flight got a third of ingest's rate while its backlog
grew.  So while a destination is behind (its last read filled a whole
window, and it is not on hold), ingest spends about ``INGEST_SLICE`` of
prepare work a turn and the requests past it wait for the next turn; and a
long delivery loop gives the loop a turn every ``YIELD_AFTER``.  Turns stay
at a few milliseconds and both get theirs.  bench/delivery.py: without the
share, 28,000 calls/s delivered while ingest took 104,000; with it, 65,000
of 75,000; with a 1.5 ms share (two batches a turn), 43,000 of 98,000.
A destination that is down or on hold is not behind: it never slows ingest.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable

INGEST_SLICE = 0.001  # seconds of ingest work a turn of the loop, at most
YIELD_AFTER = 0.002  # seconds of delivery planning before the loop gets a turn


class Pacer:
    """When a long loop on the event loop gives it a turn."""

    __slots__ = ("since",)

    def __init__(self) -> None:
        self.since = time.perf_counter()

    async def pace(self) -> None:
        if time.perf_counter() - self.since > YIELD_AFTER:
            await asyncio.sleep(0)
            self.since = time.perf_counter()


class IngestShare:
    """Ingest's share of each turn of the loop while ``contended()`` (a
    destination that is up is behind: ``Delivery.behind``).  Past it,
    requests wait in arrival order; each turn lets go as many as the share
    held lately.  Costs two clock reads a request otherwise."""

    def __init__(self, contended: Callable[[], bool], budget: float = INGEST_SLICE) -> None:
        self.budget = budget
        self.contended = contended
        self.used = 0.0  # seconds spent this turn
        self.average = budget / 8  # seconds a request, lately
        self._marked = False
        self._waiting: deque[asyncio.Future[None]] = deque()

    def full(self) -> bool:
        """Whether a request must wait (behind those already waiting)."""
        return bool(self._waiting) or (self.used >= self.budget and self.contended())

    async def wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        self._mark()
        await fut

    def spend(self, seconds: float) -> None:
        self.used += seconds
        self.average += (seconds - self.average) / 16
        self._mark()

    def _mark(self) -> None:
        if not self._marked:
            self._marked = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._marked = False
        self.used = 0.0
        n = max(1, int(self.budget / max(self.average, 1e-6))) if self.contended() else len(self._waiting)
        while n and self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():  # done: the request was cancelled
                fut.set_result(None)
                n -= 1
        if self._waiting:
            self._mark()
