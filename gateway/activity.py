"""What happens to calls, as records for live watchers (the debugger).

Ingest and delivery publish here; nobody pays for it while nobody watches
(``watched`` is one attribute read).  A watcher has a bounded buffer: when a
slow reader lets it fill, the oldest records give way and are counted, so a
watcher never holds memory or the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from gateway.events import summarize

#: records a watcher holds before the oldest give way
WATCHER_BUFFER = 2000
#: bytes of a stored call a record carries at most (the rest is cut, and said so)
CALL_EXCERPT = 16_384
FILTER_KEYS = ("source", "destination", "type", "event", "userId")
#: records about ingest, which a ``destination`` filter lets through
INGEST_KINDS = frozenset({"accepted", "rejected", "dropped"})


class Watcher:
    """One reader of the feed, with its filters and its bounded buffer."""

    def __init__(self, filters: dict[str, str], size: int = WATCHER_BUFFER) -> None:
        self.filters = {k: v for k, v in filters.items() if k in FILTER_KEYS and v}
        self.buffer: deque[dict[str, Any]] = deque(maxlen=max(1, size))
        #: records that gave way to newer ones before the reader took them
        self.dropped = 0
        self.ready = asyncio.Event()

    def wants(self, record: dict[str, Any]) -> bool:
        for key, want in self.filters.items():
            if key == "destination" and record.get("kind") in INGEST_KINDS:
                continue  # what ingest did comes before any destination: a call's story starts there
            got = record.get(key)
            if got is None or str(got) != want:
                return False
        return True

    def offer(self, record: dict[str, Any]) -> None:
        if not self.wants(record):
            return
        if len(self.buffer) == self.buffer.maxlen:
            self.dropped += 1
        self.buffer.append(record)
        self.ready.set()

    def take(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The oldest ``limit`` records (all of them by default), out of the buffer."""
        buf = self.buffer
        if limit is None or limit >= len(buf):
            out = list(buf)
            buf.clear()
        else:
            out = [buf.popleft() for _ in range(limit)]
        if not buf:
            self.ready.clear()
        return out


class ActivityFeed:
    """The records of one gateway process."""

    def __init__(self, buffer_size: int = WATCHER_BUFFER) -> None:
        self.watchers: list[Watcher] = []
        self.watched = False
        #: records each new watcher holds at most
        self.buffer_size = buffer_size

    def watch(self, filters: dict[str, str]) -> Watcher:
        w = Watcher(filters, self.buffer_size)
        self.watchers.append(w)
        self.watched = True
        return w

    def unwatch(self, w: Watcher) -> None:
        if w in self.watchers:
            self.watchers.remove(w)
        self.watched = bool(self.watchers)

    def publish(self, kind: str, **fields: Any) -> None:
        """One record, made now unless ``at`` is among the fields; callers check
        ``watched`` first when building it costs."""
        record = {"kind": kind, "at": time.time(), **fields}
        for w in self.watchers:
            w.offer(record)

    def call_record(self, kind: str, data: bytes, **fields: Any) -> None:
        """A record about one stored call, with its summary (and, for
        ``accepted``, the call as stored)."""
        extra = summarize(data)
        if kind == "accepted":
            extra["call"] = data[:CALL_EXCERPT].decode("utf-8", "replace")
            if len(data) > CALL_EXCERPT:
                extra["truncated"] = len(data)
        self.publish(kind, **extra, **fields)
