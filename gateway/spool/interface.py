"""The spool interface: what ingest, delivery, metrics, the app and the CLI
may ask of a backend.  ``tests/test_spool_contract.py`` is the suite every
backend passes."""

from __future__ import annotations

import asyncio
from typing import Callable, Iterable, Protocol

import msgspec

from gateway.events import summarize

from gateway.spool.records import Ack, DeadLetter, Pending, Record


class Spool(Protocol):
    """A durable queue of calls in arrival order, with one read position per
    destination, the calls waiting for a retry, and the dead letters.

    Positions only grow; a call's position is what cursors, retries and dead
    letters name it by."""

    #: calls held, bytes they take, and the limit that makes ``append`` refuse
    rows: int
    bytes: int
    max_bytes: int
    #: times the backend lost its storage process and started another
    restarts: int
    #: free bytes where the spool writes, and the reserve below which it refuses calls
    free_bytes: int
    min_free_bytes: int

    async def open(self) -> None:
        """Make ready; raises StorageFailed when the storage cannot be opened."""

    async def close(self) -> None:
        """Store what is pending, then release everything."""

    def subscribe(self) -> asyncio.Event:
        """An event set whenever new calls are stored."""

    def room_problem(self, size: int = 1) -> str | None:
        """Why ``size`` more bytes of calls would be refused now (503), if they would."""

    async def append(self, source: str, rows: list[bytes], ids: list[str | None] | None = None) -> int:
        """Store calls of one source durably; returns once they are, with how
        many were left out as duplicates: a call whose messageId (``ids``, one
        per row; None: the gateway made the id up) was stored within the
        dedup window is not stored again, and its id is recorded in the same
        commit as its call.  Raises SpoolFull or StorageFailed, and then
        nothing of ``rows`` is promised."""

    async def cursor(self, destination: str) -> int:
        """The destination's read position; a new destination starts at the end."""

    async def read(self, after: int, limit: int) -> list[Record]:
        """Up to ``limit`` calls stored after position ``after``, in order."""

    async def window(self, destination: str, after: int, limit: int) -> list[Record]:
        """The calls the destination delivers next: up to ``limit`` after
        ``after`` (its cursor, or the last call of the window before), in
        increasing position.  An ack's ``cursor`` covers the calls windows
        handed out up to it.  SQLite: ``read(after, limit)``, the destination's
        cursor being its position in the one log.  NATS: calls leased to this
        process from the destination's consumer (shared by every process), so
        what follows ``after`` is what this process holds, not the log."""

    async def due(self, destination: str, now: float, limit: int, exclude: Iterable[int] = ()) -> list[Pending]:
        """Retries of the destination due at ``now``, soonest first."""

    async def ack(self, ack: Ack) -> None:
        """Store what one delivery step decided, all of it or nothing."""

    async def stats(self, destination: str) -> tuple[int, int, float | None]:
        """(calls after the cursor, calls waiting for a retry, receive time of the oldest pending)."""

    async def purge(self, destinations: list[str], retention: float) -> int:
        """Remove calls every destination has read past and older than
        ``retention`` seconds; returns how many."""

    async def check_writable(self) -> None:
        """Raise StorageFailed if the storage cannot take a write now."""


class DeadLetterStore(Protocol):
    """The dead letters, for ``gateway dlq`` (also while a server runs)."""

    def list(self, destination: str | None = None, message_id: str | None = None) -> list[DeadLetter]:
        """Dead letters, oldest first, filtered by destination and messageId."""

    def replay(self, destination: str | None = None, message_id: str | None = None,
               progress: Callable[[int, int], None] = lambda done, total: None) -> list[DeadLetter]:
        """Put dead letters back in their destination's queue, due now; returns
        them.  ``progress(done, total)`` hears how far it is."""

    def close(self) -> None:
        """Release the store."""


class ReplayFilter(msgspec.Struct, kw_only=True):
    """Which retained calls ``gateway replay`` queues again."""

    since: float  # receive time, Unix seconds, inclusive
    until: float
    source: str | None = None
    types: frozenset[str] = frozenset()
    events: frozenset[str] = frozenset()

    def matches(self, call: bytes) -> bool:
        """Whether a stored call has one of ``types`` and ``events`` (any, when empty)."""
        if not (self.types or self.events):
            return True
        s = summarize(call)
        return (not self.types or s.get("type") in self.types) and (not self.events or s.get("event") in self.events)


class ReplayResult(msgspec.Struct):
    """What a replay found: calls looked at, queued (or, in a dry run, that
    would be), and matching calls the destination had not reached yet."""

    seen: int = 0
    matched: int = 0
    not_yet_delivered: int = 0


class CallArchive(Protocol):
    """The calls a spool still holds (``storage.retention``), for ``gateway replay``."""

    def held(self) -> tuple[int, float | None, float | None]:
        """(calls held, receive time of the oldest, of the newest)."""

    def cursor(self, destination: str) -> int | None:
        """The destination's read position; None if it never read the spool."""

    def candidates(self, f: ReplayFilter) -> int:
        """Calls received in the filter's time range (and source)."""

    def replay(self, destination: str, f: ReplayFilter, dry_run: bool = False,
               progress: Callable[[int, int], None] = lambda done, seen: None) -> ReplayResult:
        """Queue the matching calls again for ``destination``, due now."""

    def close(self) -> None:
        """Release the archive."""
