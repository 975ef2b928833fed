"""What a spool backend stores and hands back, whatever the backend, and the
two errors ingest answers with 503 + Retry-After."""

from __future__ import annotations

import msgspec


class SpoolFull(Exception):
    """storage.max_bytes is reached: answer 503 with Retry-After."""


class StorageFailed(Exception):
    """The disk refused a write: answer 503 with Retry-After."""


class Record(msgspec.Struct, frozen=True, gc=False):
    """One stored call.

    ``gc=False``: delivery holds windows of thousands of these; each counted
    towards the collector's threshold (even untracked), so reading them set
    off young-generation collections, 5% of the server's CPU under batches.
    A Record holds no containers, so it can be in no reference cycle."""

    seq: int
    source: str
    received: float
    data: bytes


class Pending(msgspec.Struct):
    """A call waiting for another attempt at one destination."""

    seq: int
    data: bytes
    source: str
    attempts: int
    first_failed: float
    next_at: float
    status: int | None = None
    reason: str = ""
    body: str = ""


class DeadLetter(msgspec.Struct):
    """A call a destination will not take, with why."""

    id: int
    destination: str
    seq: int
    message_id: str
    reason: str
    status: int | None
    body: str
    attempts: int
    at: float
    source: str
    data: bytes


class Ack(msgspec.Struct):
    """What one delivery step changed, committed in one transaction."""

    destination: str
    cursor: int | None = None  # new read position, if it moved
    retry: list[Pending] = msgspec.field(default_factory=list)  # to (re)schedule
    done: list[int] = msgspec.field(default_factory=list)  # seqs whose retry entry is finished
    dead: list[DeadLetter] = msgspec.field(default_factory=list)
