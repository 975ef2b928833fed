"""The embedded spool: one SQLite file in WAL mode, fsync'd on every commit.

All writes go through one writer process (``writer.py``): appends, cursors,
acks and purges are messages on a socket, grouped into one transaction per
commit.  The appends of one turn of the event loop travel as one message, so
the writer sees a few messages per commit, not one per request.  Reads use
connections of the server's own (delivery's windows on the event loop, the
rest on a reader thread); WAL lets them run beside the writer.  If the
writer process dies, what it had not answered fails with StorageFailed (a
503, never a 200) and a new one is started.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import itertools
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

from gateway.spool import writer as w
from gateway.spool.disk_room import DiskRoom
from gateway.spool.records import Ack, Pending, Record, SpoolFull, StorageFailed
from gateway.spool.sqlite_reads import SplitCache, read_after
from gateway.spool.store import FILE, ROW_CALLS, SPAN, Row, connect, segments

log = logging.getLogger(__name__)

#: where ``gateway`` is imported from, for the writer process
ROOT = Path(__file__).resolve().parents[2]
OPEN_TIMEOUT = 30.0  # seconds for a writer to open the spool
RESTART_AFTER = (0.1, 0.5, 1.0, 5.0)  # seconds before each new try at starting a writer


class _Link(asyncio.Protocol):
    """The server's end of the writer's socket."""

    def __init__(self, spool: "SqliteSpool") -> None:
        self.spool = spool
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[w.Opened] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: Any = None  # an asyncio.Transport (uvloop's are not subclasses)
        self._hello = w.Frames(w.Opened)
        self._frames = w.Frames(w.Committed)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            got = self._hello.feed(data)
            if not got:
                return
            self.opened.set_result(got[0])
            data = bytes(self._hello.buf)
        for committed in self._frames.feed(data):
            self.spool._committed(committed)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(StorageFailed("the spool writer exited before it opened the spool"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.spool._lost(self)


class _Pending:
    """The appends of one source in this turn of the loop."""

    __slots__ = ("calls", "ids", "has_ids", "waiters")

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.ids: list[str | None] = []
        self.has_ids = False
        #: (future, index of its first call in ``calls``, how many)
        self.waiters: list[tuple[asyncio.Future[list[int]], int, int]] = []

    def add(self, rows: list[bytes], ids: list[str | None] | None, waiter: asyncio.Future[list[int]]) -> None:
        calls = self.calls
        if ids or self.has_ids:
            if not self.has_ids:
                self.ids = [None] * len(calls)
                self.has_ids = True
            self.ids.extend(ids if ids else [None] * len(rows))
        self.waiters.append((waiter, len(calls), len(rows)))
        calls.extend(rows)


class SqliteSpool:
    """The spool backend used by default (``storage.backend: sqlite``)."""

    def __init__(self, path: str | Path, max_bytes: int,
                 on_commit: Callable[[float], None] = lambda seconds: None, dedup_window: float = 0.0,
                 min_free_bytes: int = -1, listener: socket.socket | None = None,
                 writer_address: str | None = None) -> None:
        self.dir = Path(path)
        self.file = self.dir / FILE
        self.max_bytes = max_bytes
        #: bytes of stored calls and their separators (a row's length + 1), as
        #: the writer's last answer counted them, and of appends not answered yet
        self._stored_bytes = 0
        self._inflight = 0
        self.rows = 0  # calls stored
        self.last_seq = 0
        #: called with each group commit's duration (metrics)
        self.on_commit = on_commit
        #: seconds a stored messageId keeps a call with the same id out (0: off)
        self.dedup_window = dedup_window
        #: free space on the spool's filesystem, against storage.min_free_bytes
        self.room = DiskRoom(self.dir, min_free_bytes, self._reusable_bytes, self.dir / (FILE + "-wal"))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: _Link | None = None  # None while no writer answers
        self._proc: subprocess.Popen[bytes] | None = None
        self._restart: asyncio.Task[None] | None = None
        self._closing = False
        self.restarts = 0  # writers that died and were replaced
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}  # request id -> its answer
        self._reader: ThreadPoolExecutor | None = None
        self._rconn: sqlite3.Connection | None = None  # on the reader thread
        self._lconn: sqlite3.Connection | None = None  # on the event loop
        self._listeners: list[asyncio.Event] = []
        self._split_cache = SplitCache()  # used on the event loop only
        #: appends of this turn of the loop, by source, sent together at its end
        self._pending: dict[str, _Pending] = {}
        self._flush_queued = False
        #: ``gateway serve --workers N``: the first worker's writer also
        #: accepts on ``listener``; the others connect to ``writer_address``
        #: instead of starting a writer of their own
        self._listener = listener
        self._writer_address = writer_address

    @property
    def bytes(self) -> int:
        """Bytes of calls held (a separator each), pending appends included."""
        return self._stored_bytes + self._inflight

    @property
    def writer_pid(self) -> int | None:
        """The writer process, while one runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    # -- life cycle -------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = False
        await self._start_writer()
        self._rconn = connect(self.file, readonly=True)
        self._lconn = connect(self.file, readonly=True)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="spool-read")
        self._page_size = int(self._lconn.execute("PRAGMA page_size").fetchone()[0])
        self.room.look()

    def _reusable_bytes(self) -> int:
        """Free pages inside the spool file: SQLite fills them before it grows the file."""
        if self._lconn is None:
            return 0
        try:
            return int(self._lconn.execute("PRAGMA freelist_count").fetchone()[0]) * self._page_size
        except sqlite3.Error:
            return 0

    @property
    def free_bytes(self) -> int:
        return self.room.left()

    @property
    def min_free_bytes(self) -> int:
        return self.room.reserve

    async def _start_writer(self) -> None:
        if self._writer_address is not None:
            await self._connect_writer(self._writer_address)
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno()] + ([self._listener.fileno()] if self._listener is not None else [])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.spool.writer", str(theirs.fileno()), str(self.file),
                 *map(str, fds[1:])], pass_fds=fds, env=env, stdin=subprocess.DEVNULL)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            link, opened = await self._handshake(sock=ours)
        except BaseException:
            ours.close()  # if the transport did not take it
            await self._reap(proc)
            raise
        self._proc = proc
        self._opened(link, opened)

    async def _connect_writer(self, address: str) -> None:
        """Use the writer another worker started (``gateway serve --workers``)."""
        try:
            link, opened = await self._handshake(path=address)
        except OSError as e:
            raise StorageFailed(f"cannot reach the spool writer at {address}: {e}") from None
        self._opened(link, opened)

    async def _handshake(self, **where: Any) -> tuple[_Link, w.Opened]:
        """Connect to a writer (``sock=`` or ``path=``) and wait for what it opened."""
        assert self._loop is not None
        link: _Link | None = None
        try:
            _, link = await self._loop.create_unix_connection(lambda: _Link(self), **where)
            opened = await asyncio.wait_for(asyncio.shield(link.opened), OPEN_TIMEOUT)
            if opened.error:
                raise StorageFailed(opened.error)
        except BaseException:
            if link is not None and link.transport is not None:
                link.transport.close()
            raise
        return link, opened

    def _opened(self, link: _Link, opened: w.Opened) -> None:
        self.rows, self._stored_bytes = opened.rows, opened.bytes
        self.last_seq = max(self.last_seq, opened.last)
        self._link = link

    async def _reap(self, proc: subprocess.Popen[bytes]) -> int:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, functools.partial(proc.wait, 10))
        except subprocess.TimeoutExpired:
            proc.kill()
            return await asyncio.get_running_loop().run_in_executor(None, proc.wait)

    def _lost(self, link: _Link) -> None:
        """The writer's socket closed: answer what it had not, start another."""
        was_live = link is self._link
        self._link = None
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(StorageFailed("the spool writer exited before answering"))
        if was_live and not self._closing:
            code = self._proc.poll() if self._proc is not None else None
            log.error("the spool writer exited (code %s); starting another", code)
            self.restarts += 1
            self._restart = asyncio.ensure_future(self._restart_writer())

    async def _restart_writer(self) -> None:
        for n in itertools.count():
            if self._proc is not None:
                await self._reap(self._proc)
                self._proc = None
            if self._closing:
                return
            await asyncio.sleep(RESTART_AFTER[min(n, len(RESTART_AFTER) - 1)])
            try:
                await self._start_writer()
                log.info("the spool writer is back")
                for ev in self._listeners:
                    ev.set()
                return
            except (OSError, StorageFailed) as e:
                log.error("could not start the spool writer: %s", e)

    async def close(self) -> None:
        if self._flush_queued:
            self._flush()
        self._closing = True
        if self._restart is not None:
            self._restart.cancel()
            try:
                await self._restart
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._restart = None
        link = self._link
        if link is not None and link.transport is not None:
            # The writer answers what it has read, then sees the end of the stream.
            link.transport.write_eof()
            await link.closed
        if self._proc is not None:
            await self._reap(self._proc)
            self._proc = None
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None
        for conn in (self._rconn, self._lconn):
            if conn is not None:
                conn.close()
        self._rconn = self._lconn = None

    def subscribe(self) -> asyncio.Event:
        """An event set whenever new calls are committed."""
        ev = asyncio.Event()
        self._listeners.append(ev)
        return ev

    # -- the writer -------------------------------------------------------

    def submit(self, make: Callable[[int], w.Request]) -> asyncio.Future[Any]:
        """Send ``make(id)`` to the writer; the future has its result."""
        assert self._loop is not None
        fut = self._loop.create_future()
        link = self._link
        if link is None or link.transport is None or link.transport.is_closing() or self._closing:
            fut.set_exception(StorageFailed("the spool writer is not running" if not self._closing
                                            else "the spool is closing"))
            return fut
        n = next(self._ids)
        self._waiting[n] = fut
        link.transport.write(w.frame(make(n)))
        return fut

    def _committed(self, group: w.Committed) -> None:
        self.on_commit(group.seconds)
        self.rows, self._stored_bytes = group.rows, group.bytes
        for reply in group.replies:
            fut = self._waiting.pop(reply.id, None)
            if fut is None or fut.done():
                continue
            if reply.error is not None:
                fut.set_exception(StorageFailed(reply.error))
            else:
                fut.set_result(reply.result)
        if group.last > self.last_seq:
            self.last_seq = group.last
            for ev in self._listeners:
                ev.set()

    # -- ingest -----------------------------------------------------------

    def room_problem(self, size: int = 1) -> str | None:
        """Why ``size`` more bytes of calls would be refused now, if they would."""
        return self._over_max(size) or self.room.problem(size)

    def _over_max(self, size: int) -> str | None:
        if self.bytes + size > self.max_bytes:
            return f"the spool holds {self.bytes} bytes; storage.max_bytes is {self.max_bytes}"
        return None

    async def append(self, source: str, rows: list[bytes], ids: list[str | None] | None = None) -> int:
        """Store calls; returns once they are committed and fsync'd, with how
        many were left out because their messageId (``ids``, one per row, None
        for none) was stored within ``dedup_window``.

        The appends of one turn of the event loop go to the writer as one
        message (one INSERT of a row per source)."""
        if not rows:
            return 0
        size = sum(map(len, rows)) + len(rows)  # a separator a call, as bytes_of() counts
        if self._link is None:
            raise StorageFailed("the spool writer is not running")
        # take: counted against the disk's room (the max_bytes check inline: this runs for every request)
        problem = (self._over_max(size) if self._stored_bytes + self._inflight + size > self.max_bytes
                   else self.room.take(size))
        if problem is not None:
            raise SpoolFull(problem)
        assert self._loop is not None
        waiter: asyncio.Future[list[int]] = self._loop.create_future()
        pending = self._pending.get(source)
        if pending is None:
            pending = self._pending[source] = _Pending()
        pending.add(rows, ids if self.dedup_window > 0 else None, waiter)
        if not self._flush_queued:
            self._flush_queued = True
            self._loop.call_soon(self._flush)
        self._inflight += size
        try:
            left_out = await waiter
        finally:
            self._inflight -= size  # the answer's totals (set before this resumes) count what was stored
        return len(left_out)

    def _flush(self) -> None:
        pending = self._pending
        self._pending, self._flush_queued = {}, False
        if not pending:
            return
        now = time.time()
        rows: list[Row] = []
        ids: list[list[str | None]] = []
        #: for each row: the appends it holds calls of, and the index of its first call among them
        owners: list[tuple[_Pending, int]] = []
        deduplicating = any(p.has_ids for p in pending.values())
        for source, p in pending.items():
            for k, row in enumerate(segments(source, p.calls, now)):
                rows.append(row)
                owners.append((p, k * ROW_CALLS))
                if deduplicating:
                    ids.append(p.ids[k * ROW_CALLS:(k + 1) * ROW_CALLS] if p.has_ids else [])
        window = self.dedup_window
        self.submit(lambda n: w.Insert(n, rows, ids, window)).add_done_callback(
            functools.partial(self._settle, pending, owners))

    def _settle(self, pending: dict[str, "_Pending"], owners: list[tuple["_Pending", int]],
                job: asyncio.Future[Any]) -> None:
        """Answer every append of one flush, each with the indexes of its
        calls the writer left out as duplicates."""
        exc = StorageFailed("the spool closed before the calls were stored") if job.cancelled() else job.exception()
        dups: dict[int, list[int]] = {}  # id of a _Pending -> indexes into its calls, in order
        if exc is None:
            for (p, first), left_out in zip(owners, job.result()[1]):
                if left_out:
                    dups.setdefault(id(p), []).extend(first + i for i in left_out)
        for p in pending.values():
            mine = dups.get(id(p))
            for fut, start, count in p.waiters:
                if fut.done():
                    continue
                if exc is not None:
                    fut.set_exception(exc)
                elif not mine:  # the common case: nothing of this source left out
                    fut.set_result([])
                else:
                    fut.set_result([i - start for i in mine[bisect.bisect_left(mine, start):
                                                          bisect.bisect_left(mine, start + count)]])

    # -- delivery ---------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        assert self._reader is not None and self._rconn is not None
        conn = self._rconn
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, conn)

    async def cursor(self, destination: str) -> int:
        """The destination's read position; a new destination starts at the end."""
        return int(await self.submit(lambda n: w.Cursor(n, destination)))

    async def read(self, after: int, limit: int) -> list[Record]:
        """Up to ``limit`` calls stored after position ``after`` (READ_BYTES
        of them at most), in order.

        On the event loop itself: what delivery reads was just written and
        is in the page cache, so a window costs a millisecond or two.  On a
        thread, each row fetched let go of the GIL and waited up to 5 ms
        (the switch interval) to get it back from a busy loop: a window of
        batches took 50-90 ms under load, and delivery fell behind ingest."""
        assert self._lconn is not None
        return read_after(self._lconn, after, limit, self._split_cache)

    async def window(self, destination: str, after: int, limit: int) -> list[Record]:
        """What the destination delivers next: the log after its cursor."""
        return await self.read(after, limit)

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
        await self.submit(lambda n: w.Acked(n, ack))

    async def stats(self, destination: str) -> tuple[int, int, float | None]:
        """(calls after the cursor, calls waiting for a retry, receive time of the oldest pending)."""
        def q(conn: sqlite3.Connection) -> tuple[int, int, float | None]:
            row = conn.execute("SELECT seq FROM cursors WHERE destination = ?", (destination,)).fetchone()
            cur = row[0] if row else 0
            crow, cidx = divmod(cur, SPAN)
            waiting = conn.execute(
                "SELECT coalesce(sum(CASE WHEN seq = ? THEN count - 1 - ? ELSE count END), 0), min(received) "
                "FROM events WHERE seq > ? OR (seq = ? AND count - 1 > ?)", (crow, cidx, crow, crow, cidx)).fetchone()
            r = conn.execute("SELECT count(*), min(first_failed) FROM retries WHERE destination = ?",
                             (destination,)).fetchone()
            ages = [t for t in (waiting[1], r[1]) if t is not None]
            return int(waiting[0]), int(r[0]), (min(ages) if ages else None)
        return await self._read(q)

    async def purge(self, destinations: list[str], retention: float) -> int:
        """Remove calls every destination has read past (and older than
        retention), a few rows a transaction (store.purge_step), and the
        messageIds older than the dedup window."""
        removed, more = 0, True
        while more:
            n, size, more = await self.submit(lambda i: w.Purge(i, destinations, retention))
            removed += n  # the answer's totals count it
        if self.dedup_window > 0:
            await self.submit(lambda i: w.PurgeIds(i, self.dedup_window))
        return removed

    async def check_writable(self) -> None:
        await self.submit(w.Check)
