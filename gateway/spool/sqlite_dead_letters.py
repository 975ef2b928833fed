"""The dead letters of a SQLite spool, for ``gateway dlq`` (also while a
server runs: SQLite's locking keeps both honest)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from gateway.spool.records import Ack, DeadLetter, Pending
from gateway.spool.store import apply_ack, connect_existing, rollback

DeadLetters = list[DeadLetter]  # (the class's ``list`` method hides the builtin in its body)
REPLAY_EVERY = 5000  # dead letters put back a transaction
DEAD_COLUMNS = "id, destination, seq, message_id, reason, status, body, attempts, at, source, data"


class SqliteDeadLetters:
    """The ``DeadLetterStore`` of the SQLite backend."""

    def __init__(self, path: str | Path) -> None:
        self.conn = connect_existing(path)

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

    def list(self, destination: str | None = None, message_id: str | None = None) -> DeadLetters:
        where, args = self._where(destination, message_id)
        rows = self.conn.execute(f"SELECT {DEAD_COLUMNS} FROM dead_letters{where} ORDER BY id", args).fetchall()
        return [DeadLetter(*r) for r in rows]

    def replay(self, destination: str | None = None, message_id: str | None = None,
               progress: Callable[[int, int], None] = lambda done, total: None) -> DeadLetters:
        """Put dead letters back in their destination's queue, due now, a few
        thousand a transaction; ``progress(done, total)`` hears how far it is."""
        letters = self.list(destination, message_id)
        now = time.time()
        for k in range(0, len(letters), REPLAY_EVERY):
            chunk = letters[k:k + REPLAY_EVERY]
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for x in chunk:
                    apply_ack(self.conn, Ack(x.destination, retry=[
                        Pending(x.seq, x.data, x.source, 0, now, now, x.status, f"replayed: {x.reason}", "")]))
                self.conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(x.id,) for x in chunk])
                self.conn.execute("COMMIT")
            except BaseException:
                rollback(self.conn)
                raise
            progress(k + len(chunk), len(letters))
        return letters
