"""Calls on their way out, cut into batches within a destination's limits."""

from __future__ import annotations

import msgspec

from gateway.config import DestinationConfig
from gateway.plugin_classes import Destination
from gateway.spool import Pending


class Item(msgspec.Struct, gc=False):
    """A call on its way out: a new record, or a retry of one (``pending``).

    ``gc=False`` as Record (gateway/spool/records.py): one per call delivered;
    a Pending refers to nothing that refers back."""

    seq: int
    source: str
    data: bytes
    payload: bytes
    pending: Pending | None = None


class Batcher:
    """Cuts items into batches of ``max_calls`` and ``max_bytes`` at most
    (the envelope's ``overhead`` plus a comma between payloads)."""

    def __init__(self, dc: DestinationConfig, dest: Destination) -> None:
        lim = dest.limits
        self.max_calls = max(1, min(dc.batch.max_calls or lim.max_batch_calls, lim.max_batch_calls))
        self.max_bytes = min(dc.batch.max_bytes or lim.max_batch_bytes, lim.max_batch_bytes)
        self.overhead = lim.batch_overhead

    def batches(self, items: list[Item]) -> list[list[Item]]:
        out: list[list[Item]] = []
        cur: list[Item] = []
        size = self.overhead
        for it in items:
            n = len(it.payload) + (1 if cur else 0)
            if cur and (len(cur) >= self.max_calls or size + n > self.max_bytes):
                out.append(cur)
                cur, size, n = [], self.overhead, len(it.payload)
            cur.append(it)
            size += n
        if cur:
            out.append(cur)
        return out
