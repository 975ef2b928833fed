"""``gateway replay`` on the SQLite backend: the calls the spool still holds
(``storage.retention``) queued again for one destination, as retries due now,
a few thousand a transaction, also while a server runs (SQLite's locking
keeps both honest)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from gateway.spool.interface import ReplayFilter, ReplayResult
from gateway.spool.records import Ack, Pending
from gateway.spool.store import SPAN, apply_ack, connect_existing, rollback

QUEUE_EVERY = 5000  # calls queued a transaction


class SqliteArchive:
    """The ``CallArchive`` of the SQLite backend."""

    def __init__(self, path: str | Path) -> None:
        self.conn = connect_existing(path)

    def close(self) -> None:
        self.conn.close()

    def held(self) -> tuple[int, float | None, float | None]:
        """(calls held, receive time of the oldest, of the newest)."""
        n, oldest, newest = self.conn.execute(
            "SELECT coalesce(sum(count), 0), min(received), max(received) FROM events").fetchone()
        return int(n), oldest, newest

    def cursor(self, destination: str) -> int | None:
        row = self.conn.execute("SELECT seq FROM cursors WHERE destination = ?", (destination,)).fetchone()
        return int(row[0]) if row else None

    def _where(self, f: ReplayFilter) -> tuple[str, list[object]]:
        clauses, args = ["received >= ?", "received <= ?"], [f.since, f.until]
        if f.source:
            clauses.append("source = ?")
            args.append(f.source)
        return " AND ".join(clauses), args

    def candidates(self, f: ReplayFilter) -> int:
        """Calls received in the filter's time range (and source): the most a replay can queue."""
        where, args = self._where(f)
        return int(self.conn.execute(f"SELECT coalesce(sum(count), 0) FROM events WHERE {where}", args).fetchone()[0])

    def replay(self, destination: str, f: ReplayFilter, dry_run: bool = False,
               progress: Callable[[int, int], None] = lambda done, seen: None) -> ReplayResult:
        """Queue the matching calls the destination has already read past;
        calls it has not reached yet are counted, not queued twice."""
        cursor = self.cursor(destination)
        result = ReplayResult()
        if cursor is None:
            return result
        where, args = self._where(f)
        now = time.time()
        batch: list[Pending] = []
        rows = self.conn.execute(f"SELECT seq, source, count, data FROM events WHERE {where} ORDER BY seq", args)
        for seq, source, _count, data in rows:
            for i, call in enumerate(data.split(b"\n")):
                pos = seq * SPAN + i
                result.seen += 1
                if not f.matches(call):
                    continue
                if pos > cursor:
                    result.not_yet_delivered += 1
                    continue
                result.matched += 1
                batch.append(Pending(pos, call, source, 0, now, now, None, "replayed: gateway replay", ""))
                if len(batch) >= QUEUE_EVERY:
                    self._queue(destination, batch, dry_run)
                    batch = []
                    progress(result.matched, result.seen)
        self._queue(destination, batch, dry_run)
        progress(result.matched, result.seen)
        return result

    def _queue(self, destination: str, batch: list[Pending], dry_run: bool) -> None:
        if dry_run or not batch:
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            apply_ack(self.conn, Ack(destination, retry=batch))
            self.conn.execute("COMMIT")
        except BaseException:
            rollback(self.conn)
            raise
