"""The durable queue between ingest and delivery: the interface
(``interface.py``), its records (``records.py``) and the backends.

SQLite is the embedded backend (``storage.backend: sqlite``): ``sqlite.py``
with its writer process (``writer.py``, ``store.py``), its reads
(``sqlite_reads.py``) and its dead letters (``sqlite_dead_letters.py``).
"""

from __future__ import annotations

from typing import Callable

from gateway.config import StorageConfig
from gateway.spool.interface import CallArchive, DeadLetterStore, ReplayFilter, ReplayResult, Spool
from gateway.spool.records import Ack, DeadLetter, Pending, Record, SpoolFull, StorageFailed


def spool_for(storage: StorageConfig, on_commit: Callable[[float], None] = lambda seconds: None) -> Spool:
    """The configured backend, not yet opened (``await spool.open()``);
    ``on_commit`` hears each group commit's duration in seconds."""
    from gateway.spool.sqlite import SqliteSpool

    return SqliteSpool(storage.path, int(storage.max_bytes), on_commit, float(storage.dedup_window),
                       int(storage.min_free_bytes))


def open_dead_letters(storage: StorageConfig) -> DeadLetterStore:
    """The configured backend's dead letters; FileNotFoundError when nothing
    was ever stored there."""
    from gateway.spool.sqlite_dead_letters import SqliteDeadLetters

    return SqliteDeadLetters(storage.path)


def open_archive(storage: StorageConfig) -> CallArchive:
    """The configured backend's retained calls; FileNotFoundError when
    nothing was ever stored there."""
    from gateway.spool.sqlite_replay import SqliteArchive

    return SqliteArchive(storage.path)


__all__ = ["CallArchive", "ReplayFilter", "ReplayResult", "open_archive", "Ack", "DeadLetter", "DeadLetterStore", "Pending", "Record", "Spool", "SpoolFull", "StorageFailed",
           "open_dead_letters", "spool_for"]
