"""The embedded spool: one SQLite file in WAL mode, fsync'd on every commit.

Each request's calls are one row (a "segment": the calls joined by newlines,
which JSON never contains unescaped), so SQLite's cost is paid per request,
not per call.  A call's position is ``row * SPAN + index``: cursors, retries
and dead letters all use it.  AUTOINCREMENT keeps row ids from ever being
reused after a purge, so positions only grow.

One writer thread owns the write connection.  It takes every job queued while
it was busy, runs them in one transaction and commits once (group commit), so
a hundred concurrent requests cost one fsync.  Reads use a second connection
on a reader thread; WAL lets them run beside the writer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

from gateway.spool import Ack, DeadLetter, Pending, Record, SpoolFull, StorageFailed

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    received REAL NOT NULL,
    count INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (
    destination TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS retries (
    destination TEXT NOT NULL,
    seq INTEGER NOT NULL,
    source TEXT NOT NULL,
    data BLOB NOT NULL,
    attempts INTEGER NOT NULL,
    first_failed REAL NOT NULL,
    next_at REAL NOT NULL,
    status INTEGER,
    reason TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (destination, seq)
);
CREATE INDEX IF NOT EXISTS retries_due ON retries (destination, next_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    seq INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    status INTEGER,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    at REAL NOT NULL,
    source TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_by_destination ON dead_letters (destination, id);
CREATE INDEX IF NOT EXISTS dead_by_message ON dead_letters (message_id);
"""

SPAN = 1 << 20  # positions per row
ROW_CALLS = 10_000  # calls per row at most (well below SPAN)
INSERT_ROWS = 64  # rows per INSERT statement
INSERT = "INSERT INTO events (source, received, count, data) VALUES "
#: the last position ever stored (0 when nothing was); sqlite_sequence survives purges
END = ("SELECT coalesce((SELECT seq * 1048576 + count - 1 FROM events ORDER BY seq DESC LIMIT 1), "
       "(SELECT seq * 1048576 + 1048575 FROM sqlite_sequence WHERE name = 'events'), 0)")
PURGE_ROWS = 32  # rows deleted a transaction by a purge
PURGE_BYTES = 1 << 20  # and bytes, past the first row
CHECKPOINT_EVERY = 0.5  # seconds between passive WAL checkpoints
Job = Callable[[sqlite3.Connection], Any]


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA busy_timeout=30000")
    if not readonly:
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsync'd at every commit, so a 200 survives power loss.
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)
    return conn


def _dead_from_row(row: tuple[Any, ...]) -> DeadLetter:
    return DeadLetter(*row)


DEAD_COLUMNS = "id, destination, seq, message_id, reason, status, body, attempts, at, source, data"


class SqliteSpool:
    """The spool backend used by default (``storage.backend: sqlite``)."""

    def __init__(self, path: str | Path, max_bytes: int) -> None:
        self.dir = Path(path)
        self.file = self.dir / "spool.sqlite3"
        self.max_bytes = max_bytes
        #: bytes of stored calls and their separators (a row's length + 1),
        #: pending appends included
        self.bytes = 0
        self.rows = 0  # calls stored
        self.last_seq = 0
        #: called with each group commit's duration (metrics)
        self.on_commit: Callable[[float], None] = lambda seconds: None
        self.failed: BaseException | None = None
        self._queue: queue.SimpleQueue[tuple[Job, asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._rconn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[asyncio.Event] = []
        self._lock = threading.Lock()
        self._split_cache = SplitCache()  # used on the reader thread only
        #: appends waiting for the writer (guarded by _lock)
        self._pending: dict[str, list[bytes]] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._flush_queued = False

    # -- life cycle -------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.dir.mkdir(parents=True, exist_ok=True)
        wconn = connect(self.file)
        self.rows, self.bytes = wconn.execute(
            "SELECT coalesce(sum(count), 0), coalesce(sum(length(data) + 1), 0) FROM events").fetchone()
        self.last_seq = wconn.execute(END).fetchone()[0]
        self._rconn = connect(self.file, readonly=True)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="spool-read")
        # Checkpoints copy the WAL into the database and fsync it: done by the
        # writer they would stall every request of that group for tens of ms.
        wconn.execute("PRAGMA wal_autocheckpoint=0")
        self._stop_checkpoints = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="spool-checkpoint", daemon=True)
        self._checkpointer.start()
        self._writer = threading.Thread(target=self._write_loop, args=(wconn,), name="spool-write", daemon=True)
        self._writer.start()

    def _checkpoint_loop(self) -> None:
        conn = connect(self.file, readonly=True)
        try:
            while not self._stop_checkpoints.wait(CHECKPOINT_EVERY):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as e:
                    log.warning("spool checkpoint failed: %s", e)
        finally:
            conn.close()

    async def close(self) -> None:
        if self._checkpointer is not None:
            self._stop_checkpoints.set()
            await asyncio.get_running_loop().run_in_executor(None, self._checkpointer.join)
            self._checkpointer = None
        if self._writer is not None:
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
            self._writer = None
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None

    def subscribe(self) -> asyncio.Event:
        """An event set whenever new calls are committed."""
        ev = asyncio.Event()
        self._listeners.append(ev)
        return ev

    # -- the writer -------------------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                jobs = [first]
                stop = False
                while True:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    jobs.append(nxt)
                self._run_group(conn, jobs)
                if stop:
                    return
        finally:
            conn.close()

    def _run_group(self, conn: sqlite3.Connection, jobs: list[tuple[Job, asyncio.Future[Any]]]) -> None:
        started = time.perf_counter()
        try:
            if len(jobs) == 1 and isinstance(jobs[0][0], _Flush) and jobs[0][0].atomic():
                # One INSERT is its own transaction: the writer takes the GIL
                # back once (after the fsync), not after each of BEGIN, INSERT
                # and COMMIT, each time waiting for a busy event loop to let go.
                results = [jobs[0][0](conn)]
            else:
                conn.execute("BEGIN IMMEDIATE")
                results = [job(conn) for job, _ in jobs]
                conn.execute("COMMIT")
            outcome: list[tuple[Any, BaseException | None]] = [(r, None) for r in results]
        except Exception as exc:  # noqa: BLE001 - any storage error is a 503, never a 200
            _rollback(conn)
            if len(jobs) == 1:
                outcome = [(None, exc)]
            else:
                # One job's failure must not fail its neighbours: run them one by one.
                outcome = []
                for job, _ in jobs:
                    try:
                        conn.execute("BEGIN IMMEDIATE")
                        r = job(conn)
                        conn.execute("COMMIT")
                        outcome.append((r, None))
                    except Exception as e:  # noqa: BLE001
                        _rollback(conn)
                        outcome.append((None, e))
        # The newest position, known from the appends themselves (no query).
        last = max((job.last for (job, _), (_, exc) in zip(jobs, outcome)
                    if exc is None and isinstance(job, _Flush)), default=0)
        elapsed = time.perf_counter() - started
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._resolve, jobs, outcome, last, elapsed)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _resolve(self, jobs: list[tuple[Job, asyncio.Future[Any]]],
                 outcome: list[tuple[Any, BaseException | None]], last: int, elapsed: float) -> None:
        self.on_commit(elapsed)
        for (_, fut), (result, exc) in zip(jobs, outcome):
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(StorageFailed(str(exc)) if not isinstance(exc, (SpoolFull, StorageFailed)) else exc)
            else:
                fut.set_result(result)
        if last > self.last_seq:
            self.last_seq = last
            for ev in self._listeners:
                ev.set()

    def submit(self, job: Job) -> asyncio.Future[Any]:
        """Run ``job(conn)`` inside the next group transaction."""
        if self._writer is None or self._loop is None:
            raise StorageFailed("the spool is not open")
        fut = self._loop.create_future()
        self._queue.put((job, fut))
        return fut

    # -- ingest -----------------------------------------------------------

    def has_room(self, size: int = 1) -> bool:
        """Whether ``size`` more bytes of calls fit."""
        return self.bytes + size <= self.max_bytes

    async def append(self, source: str, rows: list[bytes]) -> None:
        """Store calls; returns once they are committed and fsync'd.

        Appends that arrive while the writer is busy share one pending
        segment per source: the writer inserts them with one statement, so
        its thread takes the GIL a few times per group, not once per request."""
        if not rows:
            return
        size = sum(map(len, rows)) + len(rows)  # a separator a call, as bytes_of() counts
        if self.bytes + size > self.max_bytes:
            raise SpoolFull(f"the spool holds {self.bytes} bytes; storage.max_bytes is {self.max_bytes}")
        assert self._loop is not None
        waiter = self._loop.create_future()
        with self._lock:
            self._pending.setdefault(source, []).extend(rows)
            self._waiters.append(waiter)
            first = not self._flush_queued
            self._flush_queued = True
        if first:
            flush = _Flush(self)
            self.submit(flush).add_done_callback(functools.partial(_settle, flush))
        self.bytes += size
        try:
            await waiter
        except BaseException:
            self.bytes -= size
            raise
        self.rows += len(rows)

    # -- delivery ---------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        assert self._reader is not None and self._rconn is not None
        conn = self._rconn
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, conn)

    async def cursor(self, destination: str) -> int:
        """The destination's read position; a new destination starts at the end."""
        def job(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT seq FROM cursors WHERE destination = ?", (destination,)).fetchone()
            if row:
                return int(row[0])
            end = conn.execute(END).fetchone()[0]
            conn.execute("INSERT INTO cursors (destination, seq) VALUES (?, ?)", (destination, end))
            return int(end)
        return await self.submit(job)

    async def read(self, after: int, limit: int) -> list[Record]:
        """Up to ``limit`` calls stored after position ``after``, in order."""
        def q(conn: sqlite3.Connection) -> list[Record]:
            return read_after(conn, after, limit, self._split_cache)
        return await self._read(q)

    async def due(self, destination: str, now: float, limit: int, exclude: Iterable[int] = ()) -> list[Pending]:
        skip = tuple(exclude)

        def q(conn: sqlite3.Connection) -> list[Pending]:
            rows = conn.execute(
                "SELECT seq, data, source, attempts, first_failed, next_at, status, reason, body FROM retries "
                "WHERE destination = ? AND next_at <= ? ORDER BY next_at, seq LIMIT ?",
                (destination, now, limit + len(skip))).fetchall()
            return [Pending(*r) for r in rows if r[0] not in skip][:limit]
        return await self._read(q)

    async def ack(self, ack: Ack) -> None:
        await self.submit(lambda conn: apply_ack(conn, ack))

    async def stats(self, destination: str) -> tuple[int, int, float | None]:
        """(calls after the cursor, calls waiting for a retry, receive time of the oldest pending)."""
        def q(conn: sqlite3.Connection) -> tuple[int, int, float | None]:
            row = conn.execute("SELECT seq FROM cursors WHERE destination = ?", (destination,)).fetchone()
            cur = row[0] if row else 0
            crow, cidx = divmod(cur, SPAN)
            waiting = conn.execute(
                "SELECT coalesce(sum(CASE WHEN seq = ? THEN count - 1 - ? ELSE count END), 0), min(received) "
                "FROM events WHERE seq > ? OR (seq = ? AND count - 1 > ?)", (crow, cidx, crow, crow, cidx)).fetchone()
            oldest = (waiting[1],) if waiting[1] is not None else None
            r = conn.execute("SELECT count(*), min(first_failed) FROM retries WHERE destination = ?",
                             (destination,)).fetchone()
            ages = [t for t in (oldest[0] if oldest else None, r[1]) if t is not None]
            return int(waiting[0]), int(r[0]), (min(ages) if ages else None)
        return await self._read(q)

    async def purge(self, destinations: list[str], retention: float) -> int:
        """Remove calls every destination has read past (and older than retention).

        A few rows a transaction: deleting seconds' worth of calls in one
        would hold every append queued behind it for tens of milliseconds."""
        def job(conn: sqlite3.Connection) -> tuple[int, int, bool]:
            if destinations:
                marks = ",".join("?" * len(destinations))
                row = conn.execute(f"SELECT count(*), min(seq) FROM cursors WHERE destination IN ({marks})",
                                   destinations).fetchone()
                upto = row[1] if row[0] == len(destinations) else 0
            else:
                upto = conn.execute(END).fetchone()[0]
            if not upto:
                return 0, 0, False
            # Rows whose every call is behind every cursor (and old enough).
            # AUTOINCREMENT: emptying the table never hands out old ids again.
            where = "seq <= ? AND seq * 1048576 + count - 1 <= ? AND received <= ?"
            args = (upto // SPAN, upto, time.time() - retention)
            rows = conn.execute(f"SELECT seq, count, length(data) FROM events WHERE {where} ORDER BY seq LIMIT ?",
                                (*args, PURGE_ROWS)).fetchall()
            if not rows:
                return 0, 0, False
            more = len(rows) == PURGE_ROWS
            size = 0
            for n, r in enumerate(rows):  # and a few megabytes at most (rows of batches are large)
                size += r[2]
                if size > PURGE_BYTES and n:
                    rows, more = rows[:n], True
                    break
            conn.execute(f"DELETE FROM events WHERE seq >= ? AND seq <= ? AND {where}",
                         (rows[0][0], rows[-1][0], *args))
            return sum(r[1] for r in rows), sum(r[2] + 1 for r in rows), more
        removed, more = 0, True
        while more:
            n, size, more = await self.submit(job)
            self.bytes -= size
            self.rows -= n
            removed += n
        return removed

    async def check_writable(self) -> None:
        await self.submit(lambda conn: conn.execute("SELECT 1").fetchone())


class _Flush:
    """The writer's job for pending appends: takes them (once, so that a
    retried group does not lose them) and inserts one row per source."""

    def __init__(self, spool: "SqliteSpool") -> None:
        self.spool = spool
        self.taken: dict[str, list[bytes]] | None = None
        self.waiters: list[asyncio.Future[None]] = []
        self.last = 0  # the newest position written
        self._values: list[tuple[str, float, int, bytes]] | None = None

    def take(self) -> dict[str, list[bytes]]:
        if self.taken is None:
            s = self.spool
            with s._lock:
                self.taken, self.waiters = s._pending, s._waiters
                s._pending, s._waiters, s._flush_queued = {}, [], False
        return self.taken

    def values(self) -> list[tuple[str, float, int, bytes]]:
        """The rows to insert: (source, received, count, data)."""
        if self._values is None:
            now = time.time()
            self._values = [(source, now, len(part), b"\n".join(part))
                            for source, rows in self.take().items()
                            for part in (rows[i:i + ROW_CALLS] for i in range(0, len(rows), ROW_CALLS))]
        return self._values

    def atomic(self) -> bool:
        """Whether one INSERT statement holds it all."""
        return len(self.values()) <= INSERT_ROWS

    def __call__(self, conn: sqlite3.Connection) -> None:
        values = self.values()
        for i in range(0, len(values), INSERT_ROWS):
            chunk = values[i:i + INSERT_ROWS]
            cur = conn.execute(INSERT + ", ".join(["(?, ?, ?, ?)"] * len(chunk)), [v for row in chunk for v in row])
            # The rows of one statement get consecutive ids, the last one lastrowid.
            self.last = max(self.last, int(cur.lastrowid or 0) * SPAN + chunk[-1][2] - 1)


def _settle(flush: _Flush, job: asyncio.Future[Any]) -> None:
    """Answer every append of a flush (on the event loop)."""
    flush.take()  # a job that never ran still owns what was pending for it
    exc: BaseException | None
    if job.cancelled():
        exc = StorageFailed("the spool closed before the calls were stored")
    else:
        exc = job.exception()
    for w in flush.waiters:
        if not w.done():
            if exc is None:
                w.set_result(None)
            else:
                w.set_exception(exc)


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


def read_after(conn: sqlite3.Connection, after: int, limit: int, cache: SplitCache | None = None) -> list[Record]:
    """Calls after position ``after``, split out of their segments."""
    row = max(0, after) // SPAN
    out: list[Record] = []
    cur = conn.execute("SELECT seq, source, received, data FROM events WHERE seq >= ? ORDER BY seq", (row,))
    try:
        while len(out) < limit:
            got = cur.fetchmany(2)  # rows can be megabytes: fetch only what the window needs
            if not got:
                break
            for seq, source, received, data in got:
                base = seq * SPAN
                parts = cache.split(seq, data) if cache is not None else data.split(b"\n")
                first = max(0, after + 1 - base)
                for i in range(first, min(len(parts), first + limit - len(out))):
                    out.append(Record(base + i, source, received, parts[i]))
                if len(out) >= limit:
                    break
    finally:
        cur.close()
    return out


def stored_calls(path: str | Path) -> list[bytes]:
    """Every call the spool at ``path`` holds, in order (for tests and tools)."""
    conn = connect(Path(path) / "spool.sqlite3", readonly=True)
    try:
        return [r.data for r in read_after(conn, -1, 1 << 62)]
    finally:
        conn.close()


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def apply_ack(conn: sqlite3.Connection, ack: Ack) -> None:
    d = ack.destination
    if ack.cursor is not None:
        conn.execute("INSERT INTO cursors (destination, seq) VALUES (?, ?) "
                     "ON CONFLICT(destination) DO UPDATE SET seq = max(seq, excluded.seq)", (d, ack.cursor))
    if ack.done:
        conn.executemany("DELETE FROM retries WHERE destination = ? AND seq = ?", [(d, s) for s in ack.done])
    if ack.retry:
        conn.executemany(
            "INSERT INTO retries (destination, seq, source, data, attempts, first_failed, next_at, status, reason, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(destination, seq) DO UPDATE SET "
            "attempts = excluded.attempts, next_at = excluded.next_at, status = excluded.status, "
            "reason = excluded.reason, body = excluded.body",
            [(d, p.seq, p.source, p.data, p.attempts, p.first_failed, p.next_at, p.status, p.reason, p.body)
             for p in ack.retry])
    if ack.dead:
        conn.executemany(
            "INSERT INTO dead_letters (destination, seq, message_id, reason, status, body, attempts, at, source, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(d, x.seq, x.message_id, x.reason, x.status, x.body, x.attempts, x.at, x.source, x.data)
             for x in ack.dead])


class DeadLetterStore:
    """The dead letters of a spool file, read and replayed by ``gateway dlq``
    (also while a server runs: SQLite's locking keeps both honest)."""

    def __init__(self, path: str | Path) -> None:
        file = Path(path) / "spool.sqlite3"
        if not file.exists():
            raise FileNotFoundError(f"no spool at {file}")
        self.conn = connect(file)

    def close(self) -> None:
        self.conn.close()

    def _where(self, destination: str | None, message_id: str | None) -> tuple[str, list[Any]]:
        clauses, args = [], []
        if destination:
            clauses.append("destination = ?")
            args.append(destination)
        if message_id:
            clauses.append("message_id = ?")
            args.append(message_id)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def list(self, destination: str | None = None, message_id: str | None = None) -> list[DeadLetter]:
        where, args = self._where(destination, message_id)
        rows = self.conn.execute(f"SELECT {DEAD_COLUMNS} FROM dead_letters{where} ORDER BY id", args).fetchall()
        return [_dead_from_row(r) for r in rows]

    def replay(self, destination: str | None = None, message_id: str | None = None) -> list[DeadLetter]:
        """Put dead letters back in their destination's queue, due now."""
        now = time.time()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            letters = self.list(destination, message_id)
            for x in letters:
                apply_ack(self.conn, Ack(x.destination, retry=[
                    Pending(x.seq, x.data, x.source, 0, now, now, x.status, f"replayed: {x.reason}", "")]))
                self.conn.execute("DELETE FROM dead_letters WHERE id = ?", (x.id,))
            self.conn.execute("COMMIT")
        except BaseException:
            _rollback(self.conn)
            raise
        return letters
