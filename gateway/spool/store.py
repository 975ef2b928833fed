"""The spool's tables and every statement that writes them.

The writer process (``writer.py``) runs these on the one write connection;
the server reads with its own connections (``sqlite.py``), and ``gateway
dlq`` writes dead letters back with SQLite's locking between them.

Each request's calls are one row (a "segment": the calls joined by newlines,
which JSON never contains unescaped), so SQLite's cost is paid per request,
not per call.  A call's position is ``row * SPAN + index``: cursors, retries
and dead letters all use it.  AUTOINCREMENT keeps row ids from ever being
reused after a purge, so positions only grow.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from gateway.spool.records import Ack

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
FILE = "spool.sqlite3"
#: bytes the WAL file is cut back to when it restarts: a share of the filesystem, within bounds
WAL_LIMIT_SHARE, WAL_LIMIT_MIN, WAL_LIMIT_MAX = 1 / 32, 1 << 20, 256 << 20
#: a row to insert: (source, received, count, data)
Row = tuple[str, float, int, bytes]


def wal_size_limit(path: Path) -> int:
    """How large the WAL file may stay after a burst, for the filesystem of ``path``."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return WAL_LIMIT_MAX
    return int(min(WAL_LIMIT_MAX, max(WAL_LIMIT_MIN, st.f_blocks * st.f_frsize * WAL_LIMIT_SHARE)))


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA busy_timeout=30000")
    if not readonly:
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsync'd at every commit, so a 200 survives power loss.
        conn.execute("PRAGMA synchronous=FULL")
        # After a burst the WAL is cut back to this when it restarts, so its
        # file does not keep the burst's size on a small disk (disk_room.py).
        # Not smaller: a WAL that grows again makes every fsync write metadata.
        conn.execute(f"PRAGMA journal_size_limit={wal_size_limit(path)}")
        conn.executescript(SCHEMA)
    return conn


def connect_existing(directory: str | Path) -> sqlite3.Connection:
    """A write connection to the spool of ``directory``, for the command line
    beside a running server; FileNotFoundError when nothing was stored there."""
    file = Path(directory) / FILE
    if not file.exists():
        raise FileNotFoundError(f"no spool at {file}")
    return connect(file)


def totals(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """(calls stored, their bytes with a separator each, the last position)."""
    rows, size = conn.execute(
        "SELECT coalesce(sum(count), 0), coalesce(sum(length(data) + 1), 0) FROM events").fetchone()
    return int(rows), int(size), int(conn.execute(END).fetchone()[0])


def segments(source: str, calls: list[bytes], received: float) -> list[Row]:
    """The rows that hold ``calls`` of one source: ROW_CALLS calls a row at most."""
    return [(source, received, len(part), b"\n".join(part))
            for part in (calls[i:i + ROW_CALLS] for i in range(0, len(calls), ROW_CALLS))]


def insert(conn: sqlite3.Connection, rows: list[Row]) -> int:
    """Insert rows (a few per statement); returns the newest position written."""
    last = 0
    for i in range(0, len(rows), INSERT_ROWS):
        chunk = rows[i:i + INSERT_ROWS]
        cur = conn.execute(INSERT + ", ".join(["(?, ?, ?, ?)"] * len(chunk)), [v for row in chunk for v in row])
        # The rows of one statement get consecutive ids, the last one lastrowid.
        last = max(last, int(cur.lastrowid or 0) * SPAN + chunk[-1][2] - 1)
    return last


def cursor_of(conn: sqlite3.Connection, destination: str) -> int:
    """The destination's read position; a new destination starts at the end."""
    row = conn.execute("SELECT seq FROM cursors WHERE destination = ?", (destination,)).fetchone()
    if row:
        return int(row[0])
    end = conn.execute(END).fetchone()[0]
    conn.execute("INSERT INTO cursors (destination, seq) VALUES (?, ?)", (destination, end))
    return int(end)


def purge_step(conn: sqlite3.Connection, destinations: list[str], retention: float) -> tuple[int, int, bool]:
    """Delete a few rows every destination has read past (and older than
    retention): (calls removed, their bytes, whether more could go).

    A few rows a transaction: deleting seconds' worth of calls in one would
    hold every append queued behind it for tens of milliseconds."""
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
    for n, r in enumerate(rows):  # and a megabyte or so at most (rows of batches are large)
        size += r[2]
        if size > PURGE_BYTES and n:
            rows, more = rows[:n], True
            break
    conn.execute(f"DELETE FROM events WHERE seq >= ? AND seq <= ? AND {where}",
                 (rows[0][0], rows[-1][0], *args))
    return sum(r[1] for r in rows), sum(r[2] + 1 for r in rows), more


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


def rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass
