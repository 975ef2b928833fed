"""Reading calls out of the SQLite spool: rows hold a request's calls joined
by newlines (store.py), so a read splits them, bounded by count and bytes."""

from __future__ import annotations

import sqlite3
from itertools import accumulate, repeat
from pathlib import Path

from gateway.spool.records import Record
from gateway.spool.store import FILE, SPAN, connect

FETCH_ROWS = 256  # rows a read fetches at a time at most
READ_BYTES = 16 << 20  # bytes of calls a delivery read returns at most (besides its count)


class SplitCache:
    """The last few rows read, split into calls: consecutive windows of one
    destination read the same row, and several destinations read near each other."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.rows: dict[int, list[bytes]] = {}

    def split(self, seq: int, data: bytes) -> list[bytes]:
        parts = self.rows.get(seq)
        if parts is None:
            if len(self.rows) >= self.size:
                del self.rows[next(iter(self.rows))]
            parts = self.rows[seq] = data.split(b"\n")
        return parts


def read_after(conn: sqlite3.Connection, after: int, limit: int, cache: SplitCache | None = None,
               max_bytes: int = READ_BYTES) -> list[Record]:
    """Calls after position ``after``, split out of their segments: ``limit``
    at most, and no more once ``max_bytes`` are read (one call at least)."""
    row = max(0, after) // SPAN
    out: list[Record] = []
    cur = conn.execute("SELECT seq, source, received, data FROM events WHERE seq >= ? ORDER BY seq", (row,))
    # Rows can be megabytes: fetch only as many as the window needs, judged
    # by the calls a row held so far (rows of single calls hold a few each).
    want, rows_seen, calls_seen, size = 2, 0, 0, 0
    try:
        while len(out) < limit and size < max_bytes:
            got = cur.fetchmany(want)
            if not got:
                break
            for seq, source, received, data in got:
                base = seq * SPAN
                parts = cache.split(seq, data) if cache is not None else data.split(b"\n")
                rows_seen += 1
                calls_seen += len(parts)
                first = max(0, after + 1 - base)
                end = min(len(parts), first + limit - len(out))
                if first < end:
                    # A row's calls at once (map, not a loop of appends: this
                    # runs on the event loop for every call delivered).
                    take = parts[first:end]
                    sizes = list(map(len, take))
                    taken = sum(sizes)
                    if size + taken >= max_bytes:  # the call that reaches max_bytes is the last
                        end = first + next(i for i, total in enumerate(accumulate(sizes, initial=size))
                                            if total >= max_bytes)
                        take = parts[first:end]
                        taken = sum(sizes[:end - first])
                    out.extend(map(Record, range(base + first, base + end), repeat(source), repeat(received), take))
                    size += taken
                if len(out) >= limit or size >= max_bytes:
                    break
            want = min(FETCH_ROWS, (limit - len(out)) * rows_seen // calls_seen + 1)
    finally:
        cur.close()
    return out


def stored_calls(path: str | Path) -> list[bytes]:
    """Every call the spool at ``path`` holds, in order (for tests and tools)."""
    conn = connect(Path(path) / FILE, readonly=True)
    try:
        return [r.data for r in read_after(conn, -1, 1 << 62, max_bytes=1 << 62)]
    finally:
        conn.close()
