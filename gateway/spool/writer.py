"""The spool's writer: a process of its own that owns the write connection.

Why a process: the event loop keeps the server's GIL busy, and a writer
thread needs the GIL between every SQLite call of a commit; each time it
waited up to the interpreter's 5 ms switch interval, so requests sat idle
waiting for their fsync while the loop had work it could not start.  Here
the writer has an interpreter to itself.

It reads requests from a socket (a 4-byte length, then msgpack), takes every
request that arrived while it was busy, runs them in one transaction and
commits once (group commit), then answers them all in one write.  It stops
when the server closes the socket (or dies: the socket closes with it), after
answering what it has read; SIGINT and SIGTERM are the server's to handle.

With ``gateway serve --workers N`` the server also hands it a listening
socket: the other workers connect there, and their appends join the same
groups (one commit for the calls of every worker).

    python -m gateway.spool.writer FD PATH [LISTEN_FD]
"""

from __future__ import annotations

import select
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from gateway.spool.message_ids import MessageIds
from gateway.spool.records import Ack
from gateway.spool.store import END, Row, apply_ack, connect, cursor_of, insert, purge_step, rollback, totals

HEADER = struct.Struct("<I")
CHECKPOINT_EVERY = 0.5  # seconds between passive WAL checkpoints
RECV = 1 << 20


class Insert(msgspec.Struct, tag=True, array_like=True):
    """Rows to store.  With ``ids`` (the messageIds of each row's calls, or
    empty lists), a call whose id was stored within ``window`` seconds is
    left out; the result is (newest position, the left-out indexes of each row)."""

    id: int
    rows: list[Row]
    ids: list[list[str | None]] = []
    window: float = 0.0


class Cursor(msgspec.Struct, tag=True, array_like=True):
    id: int
    destination: str


class Acked(msgspec.Struct, tag=True, array_like=True):
    id: int
    ack: Ack


class Purge(msgspec.Struct, tag=True, array_like=True):
    id: int
    destinations: list[str]
    retention: float


class Check(msgspec.Struct, tag=True, array_like=True):
    id: int


class PurgeIds(msgspec.Struct, tag=True, array_like=True):
    id: int
    window: float


Request = Insert | Cursor | Acked | Purge | Check | PurgeIds


class Reply(msgspec.Struct, array_like=True):
    id: int
    error: str | None
    result: Any


class Committed(msgspec.Struct, array_like=True):
    """The answers to one group, how long its transaction took, the
    newest position its inserts wrote (0 when none did), and the calls and
    bytes the spool holds after it (every worker's appends and purges)."""

    seconds: float
    replies: list[Reply]
    last: int
    rows: int = 0
    bytes: int = 0


class Opened(msgspec.Struct, array_like=True):
    """The first message: the spool's totals, or why it could not open."""

    error: str | None = None
    rows: int = 0
    bytes: int = 0
    last: int = 0


encoder = msgspec.msgpack.Encoder()


def frame(msg: msgspec.Struct) -> bytes:
    payload = encoder.encode(msg)
    return HEADER.pack(len(payload)) + payload


class Frames:
    """Split a byte stream into whole messages."""

    def __init__(self, type_: Any) -> None:
        self.buf = bytearray()
        self.decoder = msgspec.msgpack.Decoder(type_)

    def feed(self, data: bytes) -> list[Any]:
        buf = self.buf
        buf += data
        out = []
        at = 0
        view = memoryview(buf)
        try:
            while len(buf) - at >= 4:
                (size,) = HEADER.unpack_from(buf, at)
                if len(buf) - at - 4 < size:
                    break
                out.append(self.decoder.decode(view[at + 4:at + 4 + size]))
                at += 4 + size
        finally:
            view.release()
        if at:
            del buf[:at]
        return out


def _insert_new(conn: sqlite3.Connection, known: MessageIds,
                req: Insert) -> tuple[tuple[int, list[list[int]]], list[Row]]:
    """Insert rows without the calls whose messageId is already stored (the
    ids of all rows claimed at once: one lookup and one log row a request)."""
    dups = iter(known.claim([mid for ids in req.ids for mid in ids], time.time(), req.window))
    rows: list[Row] = []
    left_out: list[list[int]] = []
    at, dup = 0, next(dups, None)
    for row, ids in zip(req.rows, req.ids):
        mine: list[int] = []
        while dup is not None and dup < at + len(ids):
            mine.append(dup - at)
            dup = next(dups, None)
        at += len(ids)
        left_out.append(mine)
        if not mine:
            rows.append(row)
        elif len(mine) < row[2]:
            skip = set(mine)
            calls = [c for i, c in enumerate(row[3].split(b"\n")) if i not in skip]
            rows.append((row[0], row[1], len(calls), b"\n".join(calls)))
    return ((insert(conn, rows) if rows else 0), left_out), rows


def run(conn: sqlite3.Connection, known: MessageIds, req: Request) -> tuple[Any, int, int]:
    """A request's result, and the calls and bytes it added to the spool (negative: removed)."""
    if isinstance(req, Insert):
        if req.ids:
            result, rows = _insert_new(conn, known, req)
        else:
            result, rows = (insert(conn, req.rows), []), req.rows
        return result, sum(r[2] for r in rows), sum(len(r[3]) + 1 for r in rows)
    if isinstance(req, PurgeIds):
        return known.purge(req.window), 0, 0
    if isinstance(req, Cursor):
        return cursor_of(conn, req.destination), 0, 0
    if isinstance(req, Acked):
        return apply_ack(conn, req.ack), 0, 0
    if isinstance(req, Purge):
        n, size, more = purge_step(conn, req.destinations, req.retention)
        return (n, size, more), -n, -size
    conn.execute("SELECT 1").fetchone()
    return None, 0, 0


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _transaction(conn: sqlite3.Connection, known: MessageIds, reqs: list[Request]) -> list[tuple[Any, int, int]]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        results = [run(conn, known, r) for r in reqs]
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        known.rolled_back()
        raise
    known.committed()
    return results


class Totals:
    """What the spool holds, kept by the writer from its commits."""

    def __init__(self, rows: int, size: int) -> None:
        self.rows, self.bytes = rows, size

    def add(self, result: tuple[Any, int, int]) -> Any:
        self.rows += result[1]
        self.bytes += result[2]
        return result[0]


def run_group(conn: sqlite3.Connection, known: MessageIds, reqs: list[Request], totals: Totals) -> Committed:
    """One transaction for all; if it fails, each on its own, so one bad
    request does not fail its neighbours."""
    started = time.perf_counter()
    try:
        replies = [Reply(r.id, None, totals.add(res)) for r, res in zip(reqs, _transaction(conn, known, reqs))]
    except Exception as exc:  # noqa: BLE001 - any storage error is the server's 503, never a 200
        if len(reqs) == 1:
            replies = [Reply(reqs[0].id, _why(exc), None)]
        else:
            replies = []
            for r in reqs:
                try:
                    replies.append(Reply(r.id, None, totals.add(_transaction(conn, known, [r])[0])))
                except Exception as e:  # noqa: BLE001
                    replies.append(Reply(r.id, _why(e), None))
    last = max((rep.result[0] for r, rep in zip(reqs, replies) if isinstance(r, Insert) and rep.error is None),
               default=0)
    return Committed(time.perf_counter() - started, replies, last, totals.rows, totals.bytes)


def _checkpoints(file: Path, stop: threading.Event) -> None:
    """Copy the WAL into the database now and then, beside the writer: done
    by the writer, a checkpoint's fsync would stall its group for tens of ms."""
    conn = connect(file, readonly=True)
    failing = False  # said once when checkpoints start failing (a full disk), once when they work again
    try:
        while not stop.wait(CHECKPOINT_EVERY):
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as e:
                if not failing:
                    print(f"gateway spool writer: checkpoints fail ({e}); trying again every "
                          f"{CHECKPOINT_EVERY}s", file=sys.stderr)
                failing = True
                continue
            if failing:
                print("gateway spool writer: checkpoints work again", file=sys.stderr)
                failing = False
    finally:
        conn.close()


class _Peer:
    """One connected server process: its socket and what it sent so far."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.frames = Frames(Request)
        self.eof = False

    def take(self, data: bytes) -> list[Request]:
        self.eof = self.eof or not data
        return self.frames.feed(data) if data else []


def serve(sock: socket.socket, file: Path, listener: socket.socket | None = None) -> None:
    """Serve the server on ``sock`` (and, with a ``listener``, every other
    worker that connects) until the server's socket closes."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(file)
        conn.execute("PRAGMA wal_autocheckpoint=0")
        rows, size, last = totals(conn)
        known = MessageIds(conn, file)
    except (OSError, sqlite3.Error) as e:
        sock.sendall(frame(Opened(error=f"cannot open the spool at {file}: {e}")))
        return
    known.start()
    kept = Totals(rows, size)
    sock.sendall(frame(Opened(None, rows, size, last)))
    stop = threading.Event()
    checkpointer = threading.Thread(target=_checkpoints, args=(file, stop), name="spool-checkpoint", daemon=True)
    checkpointer.start()
    server = _Peer(sock)
    peers = {sock.fileno(): server}
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if listener is not None:
        poller.register(listener, select.POLLIN)
    try:
        while not server.eof:
            got: list[tuple[_Peer, list[Request]]] = []
            for fd, _ in poller.poll():
                if listener is not None and fd == listener.fileno():
                    _welcome(listener, conn, kept, peers, poller)
                    continue
                peer = peers[fd]
                reqs: list[Request] = []
                while not peer.eof:  # all it sent, also while the last group ran
                    try:
                        reqs += peer.take(peer.sock.recv(RECV, socket.MSG_DONTWAIT))
                    except BlockingIOError:
                        break
                    except OSError:  # reset: a worker that died
                        peer.eof = True
                if reqs:
                    got.append((peer, reqs))
            if got:
                group = run_group(conn, known, [r for _, reqs in got for r in reqs], kept)
                at = 0
                for peer, reqs in got:
                    mine = Committed(group.seconds, group.replies[at:at + len(reqs)], group.last,
                                     group.rows, group.bytes)
                    at += len(reqs)
                    try:
                        peer.sock.sendall(frame(mine))
                    except OSError:
                        if peer is server:
                            raise
                        peer.eof = True  # a worker that died: what it asked is committed anyway
                if all(peer is not server for peer, _ in got):
                    # The server delivers: it hears of every commit, its own or not.
                    sock.sendall(frame(Committed(group.seconds, [], group.last, group.rows, group.bytes)))
            for fd, peer in list(peers.items()):
                if peer.eof and peer is not server:
                    poller.unregister(fd)
                    peer.sock.close()
                    del peers[fd]
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server is gone; what was committed stays
    finally:
        stop.set()
        checkpointer.join()
        known.close()
        for peer in peers.values():
            if peer is not server:
                peer.sock.close()
        conn.close()


def _welcome(listener: socket.socket, conn: sqlite3.Connection, kept: Totals,
             peers: dict[int, _Peer], poller: select.poll) -> None:
    """A worker connects: tell it what the spool holds, then serve it too."""
    try:
        sock, _ = listener.accept()
    except OSError:
        return
    try:
        sock.sendall(frame(Opened(None, kept.rows, kept.bytes, int(conn.execute(END).fetchone()[0]))))
    except OSError:
        sock.close()
        return
    peers[sock.fileno()] = _Peer(sock)
    poller.register(sock, select.POLLIN)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fd, path = int(argv[0]), Path(argv[1])
    listener = socket.socket(fileno=int(argv[2])) if len(argv) > 2 else None
    with socket.socket(fileno=fd) as sock:
        serve(sock, path, listener)
    if listener is not None:
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
