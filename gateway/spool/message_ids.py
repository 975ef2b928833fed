"""The messageIds of stored calls, for deduplication (``storage.dedup_window``).

Why not one table keyed by id in the spool: ids are random, so each one
claimed in a commit dirtied a page of its own (4 KB in the WAL, fsync'd
with the calls: six times the bytes of a commit of single calls) and its
purge did as much again.  Here the commit of the calls appends one log row
of their ids (``message_id_log``, a few bytes an id, in the same transaction,
so an id is recorded exactly when its call is).  An indexer thread then
moves the log into a table keyed by id in a file of its own
(``spool-ids.sqlite3``), tens of thousands of ids a transaction, in key
order and off the writer's lock, and the writer deletes the moved rows.
Until then the writer knows the log's ids from memory: what it holds is what
the indexer has not taken yet, about a second's worth.

The index holds one table a span of time as long as the window; a span is
dropped whole once every id in it is past the window, which costs a drop,
not a delete an id.  A lookup asks the live spans (two at most) and checks
the time.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from gateway.spool.store import rollback, wal_size_limit

LOG_SCHEMA = """
CREATE TABLE IF NOT EXISTS message_id_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused once purged: the indexer's mark is a seq
    at REAL NOT NULL,
    ids TEXT NOT NULL
);
"""
INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    name TEXT PRIMARY KEY,
    start REAL NOT NULL,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS indexed (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    seq INTEGER NOT NULL
);
"""
FILE = "spool-ids.sqlite3"
INDEX_EVERY = 1.0  # seconds between the indexer's turns: more ids a transaction cost less each
DROP_AFTER = 1.0  # a span is dropped this long after its last id left the window (lookups skip it before)
ID_BATCH = 1000  # ids a lookup statement

_json = msgspec.json.Encoder()
_ids = msgspec.json.Decoder(list[str])

# A join, not ``id IN (SELECT ...)``: that builds a temporary b-tree of the ids first.
_LOOKUP = "SELECT t.id FROM json_each(?1) AS j JOIN \"{}\" AS t ON t.id = j.value WHERE t.at >= ?2"
MAP_BYTES = 1 << 30  # of the index file read through mmap, at most


def connect_index(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # log rows are deleted once here: this must survive power loss
    conn.execute(f"PRAGMA journal_size_limit={wal_size_limit(path)}")  # as the spool's, after a burst
    # Random ids make every lookup a cold page: read from the OS's page
    # cache without a copy and a system call each (half a lookup's time).
    conn.execute(f"PRAGMA mmap_size={MAP_BYTES}")
    conn.executescript(INDEX_SCHEMA)
    return conn


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[None]:
    conn.execute(begin)
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def migrate(conn: sqlite3.Connection) -> None:
    """Move the ids of the table that held them before (``message_ids``) into the log."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'message_ids'").fetchone():
        return
    with _transaction(conn, "BEGIN IMMEDIATE"):
        conn.execute("INSERT INTO message_id_log (at, ids) SELECT max(at), json_group_array(id) FROM message_ids "
                     "GROUP BY CAST(at AS INTEGER) ORDER BY 1")
        conn.execute("DROP TABLE message_ids")  # and its index, message_ids_by_time


class Indexer:
    """Moves log rows into the index; runs on a thread of the writer process
    with connections of its own (the log is read through an ATTACH)."""

    def __init__(self, spool_file: Path) -> None:
        self.conn = connect_index(spool_file.parent / FILE)
        self.conn.execute("ATTACH DATABASE ? AS spool", (str(spool_file),))  # read only: see step()
        row = self.conn.execute("SELECT seq FROM indexed").fetchone()
        #: the log rows up to here are in the index (published after each commit)
        self.done = int(row[0]) if row else 0
        #: the live spans, (table, start, until), published before ``done`` moves past their rows
        self.spans = self._spans()
        self.window = 0.0  # the writer's, from its requests

    def _spans(self) -> list[tuple[str, float, float]]:
        return [tuple(r) for r in self.conn.execute("SELECT name, start, until FROM spans ORDER BY start")]

    def step(self) -> None:
        """Index every log row written since the last step, and drop spans gone past the window."""
        window = self.window
        if window <= 0:
            return
        conn = self.conn
        upto, low, high = conn.execute("SELECT max(seq), min(at), max(at) FROM spool.message_id_log "
                                       "WHERE seq > ?", (self.done,)).fetchone()
        if upto is not None:
            # Deferred, not IMMEDIATE: that would take the write lock of the
            # attached spool too and hold the writer back.
            with _transaction(conn):
                width = max(window, 1.0)
                first = max(low, time.time() - window)  # older rows are past the window already
                for k in range(int(first // width), int(high // width) + 1):
                    start, until = k * width, (k + 1) * width
                    name = self._span(start, until)
                    conn.execute(f"INSERT INTO \"{name}\" (id, at) SELECT j.value, l.at "
                                 "FROM spool.message_id_log AS l, json_each(l.ids) AS j "
                                 "WHERE l.seq > ?1 AND l.seq <= ?2 AND l.at >= ?3 AND l.at < ?4 "
                                 # In key order: each page of the index is then visited once a
                                 # step, not once an id (less than half the CPU at 100,000 ids a step).
                                 "ORDER BY j.value "
                                 "ON CONFLICT(id) DO UPDATE SET at = max(at, excluded.at)",
                                 (self.done, upto, start, until))
                conn.execute("INSERT INTO indexed (one, seq) VALUES (1, ?) "
                             "ON CONFLICT(one) DO UPDATE SET seq = excluded.seq", (upto,))
            self.spans = self._spans()
            self.done = int(upto)
        self._drop(time.time() - window - DROP_AFTER)

    def _span(self, start: float, until: float) -> str:
        """The table of one span of time, made if it is new (in the caller's
        transaction; ``spans`` holds every other, read after each commit)."""
        for name, s, u in self.spans:
            if s <= start and until <= u:
                return name
        name = f"ids_{int(start * 1000)}_{int(until * 1000)}"
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS \"{name}\" (id TEXT PRIMARY KEY, at REAL NOT NULL) "
                          "WITHOUT ROWID")
        self.conn.execute("INSERT OR IGNORE INTO spans (name, start, until) VALUES (?, ?, ?)", (name, start, until))
        return name

    def _drop(self, before: float) -> None:
        old = [name for name, _, until in self.spans if until <= before]
        for name in old:
            with _transaction(self.conn):
                self.conn.execute(f"DROP TABLE IF EXISTS \"{name}\"")
                self.conn.execute("DELETE FROM spans WHERE name = ?", (name,))
        if old:
            self.spans = self._spans()

    def run(self, stop: threading.Event) -> None:
        failing = False
        while not stop.wait(INDEX_EVERY):
            try:
                self.step()
            except sqlite3.Error as e:  # a full disk: the log keeps the ids, memory knows them
                if not failing:
                    print(f"gateway spool writer: indexing messageIds fails ({e}); trying again", file=sys.stderr)
                failing = True
                continue
            failing = False

    def close(self) -> None:
        self.conn.close()


class MessageIds:
    """The writer's side: claims ids in its transactions, knows the ones not
    indexed yet, and removes log rows the indexer has taken."""

    def __init__(self, conn: sqlite3.Connection, spool_file: Path) -> None:
        conn.executescript(LOG_SCHEMA)
        migrate(conn)
        self.indexer = Indexer(spool_file)
        self.lookups = connect_index(spool_file.parent / FILE)
        self.log = conn
        #: id -> (log row, time) of every logged id the index may not have yet
        self.recent: dict[str, tuple[int, float]] = {}
        self._rows: deque[tuple[int, list[str]]] = deque()  # the log rows behind ``recent``, in order
        self._staged: dict[str, tuple[int, float]] = {}  # claimed in the open transaction
        self._staged_rows: list[tuple[int, list[str]]] = []
        self._seen = 0  # the indexer's progress as last applied
        for seq, at, ids in conn.execute("SELECT seq, at, ids FROM message_id_log WHERE seq > ? ORDER BY seq",
                                         (self.indexer.done,)):
            self._remember(self.recent, self._rows, int(seq), float(at), _ids.decode(ids))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.indexer.run, args=(self._stop,), name="spool-ids", daemon=True)
        self._thread.start()

    @staticmethod
    def _remember(into: dict[str, tuple[int, float]], rows: deque[tuple[int, list[str]]] | list[tuple[int, list[str]]],
                  seq: int, at: float, ids: list[str]) -> None:
        for mid in ids:
            into[mid] = (seq, at)
        rows.append((seq, ids))

    def _catch_up(self) -> None:
        """Forget from memory what the indexer has committed."""
        done = self.indexer.done
        if done == self._seen:
            return
        self._seen = done
        rows, recent = self._rows, self.recent
        while rows and rows[0][0] <= done:
            seq, ids = rows.popleft()
            for mid in ids:
                if recent.get(mid, (None,))[0] == seq:
                    del recent[mid]

    def _indexed(self, ids: list[str], since: float) -> set[str]:
        """Which of ``ids`` the index holds with a time at or after ``since``."""
        found: set[str] = set()
        for name, _, until in self.indexer.spans:
            if until <= since:
                continue  # every id in it is past the window
            try:
                for k in range(0, len(ids), ID_BATCH):
                    found.update(r[0] for r in self.lookups.execute(_LOOKUP.format(name),
                                                                      (_json.encode(ids[k:k + ID_BATCH]), since)))
            except sqlite3.OperationalError:
                if any(n == name for n, _, _ in self.indexer.spans):
                    raise
                # dropped since: it held only ids past the window
        return found

    def claim(self, ids: list[str | None], now: float, window: float) -> list[int]:
        """Record the messageIds of calls about to be stored, in the open
        transaction of the insert; returns the indexes of those stored
        within ``window`` seconds (or earlier in ``ids``), which must not be
        stored again."""
        self.indexer.window = window
        self._catch_up()
        since = now - window
        staged, recent = self._staged, self.recent
        duplicates: list[int] = []
        fresh: dict[str, int] = {}  # id -> its index in ids
        for i, mid in enumerate(ids):
            if mid is None:
                continue
            hit = staged.get(mid) or recent.get(mid)
            if mid in fresh or (hit is not None and hit[1] >= since):
                duplicates.append(i)
            else:
                fresh[mid] = i
        if fresh:
            for mid in self._indexed(list(fresh), since):
                duplicates.append(fresh.pop(mid))
            duplicates.sort()
        if fresh:
            claimed = list(fresh)
            cur = self.log.execute("INSERT INTO message_id_log (at, ids) VALUES (?, ?)", (now, _json.encode(claimed)))
            self._remember(staged, self._staged_rows, int(cur.lastrowid or 0), now, claimed)
        return duplicates

    def committed(self) -> None:
        """The open transaction committed: what it claimed is recorded."""
        if self._staged:
            self.recent.update(self._staged)
            self._rows.extend(self._staged_rows)
        self.rolled_back()

    def rolled_back(self) -> None:
        self._staged, self._staged_rows = {}, []

    def purge(self, window: float) -> int:
        """Delete the log rows the index holds (in the caller's transaction);
        returns how many ids that forgot from memory.  Also tells the indexer
        the window when no call came since the writer started, so that spans
        past it are dropped on an idle gateway too."""
        self.indexer.window = window
        before = len(self.recent)
        self._catch_up()
        self.log.execute("DELETE FROM message_id_log WHERE seq <= ?", (self.indexer.done,))
        return before - len(self.recent)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.indexer.close()
        self.lookups.close()

