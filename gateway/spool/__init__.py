"""The durable queue between ingest and delivery: the interface
(``interface.py``), its records (``records.py``) and the backends.

SQLite is the embedded backend (``storage.backend: sqlite``): ``sqlite.py``
with its writer process (``writer.py``, ``store.py``), its reads
(``sqlite_reads.py``) and its dead letters (``sqlite_dead_letters.py``).
NATS JetStream is the backend of many processes (``storage.backend: nats``):
``nats.py`` with ``nats_js.py`` (connection, API, names), ``nats_lanes.py``
(what one process leases) and ``nats_dead_letters.py`` (the command line's
dead letters and replays).  nats-py is imported only by that backend.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable, Sequence

from gateway.config import DestinationConfig, StorageConfig
from gateway.spool.interface import CallArchive, DeadLetterStore, ReplayFilter, ReplayResult, Spool
from gateway.spool.records import Ack, DeadLetter, Pending, Record, SpoolFull, StorageFailed

if TYPE_CHECKING:
    import socket


def spool_for(storage: StorageConfig, on_commit: Callable[[float], None] = lambda seconds: None,
              destinations: Sequence[DestinationConfig] = (), *, listener: "socket.socket | None" = None,
              writer_address: str | None = None) -> Spool:
    """The configured backend, not yet opened (``await spool.open()``);
    ``on_commit`` hears each group commit's duration in seconds.  NATS
    creates the ``destinations``' consumers when it opens, before the
    server takes calls.

    ``gateway serve --workers``, on SQLite: the first worker's writer also
    accepts the other workers on ``listener``; they reach it at ``writer_address``."""
    if storage.backend == "nats":
        from gateway.spool.nats import NatsSpool

        return NatsSpool(storage, destinations, on_commit)
    from gateway.spool.sqlite import SqliteSpool

    return SqliteSpool(storage.path, int(storage.max_bytes), on_commit, float(storage.dedup_window),
                       int(storage.min_free_bytes), listener, writer_address)


async def spool_problems(spool: Spool, size: int, timeout: float) -> list[str]:
    """Why the spool cannot take a call of ``size`` bytes now, one line each
    (``/ready``): it refuses calls, or its store does not take a write
    within ``timeout`` seconds."""
    problems = []
    full = spool.room_problem(size)
    if full is not None:
        problems.append(f"the spool refuses calls: {full}")
    try:
        async with asyncio.timeout(timeout):
            await spool.check_writable()
    except (StorageFailed, asyncio.TimeoutError) as e:
        problems.append(f"spool not writable: {e or 'timed out'}")
    return problems


def open_dead_letters(storage: StorageConfig) -> DeadLetterStore:
    """The configured backend's dead letters; FileNotFoundError when nothing
    was ever stored there (StorageFailed: the NATS cluster does not answer)."""
    if storage.backend == "nats":
        from gateway.spool.nats_dead_letters import NatsDeadLetters

        return NatsDeadLetters(storage)
    from gateway.spool.sqlite_dead_letters import SqliteDeadLetters

    return SqliteDeadLetters(storage.path)


def open_archive(storage: StorageConfig) -> CallArchive:
    """The configured backend's retained calls; FileNotFoundError when
    nothing was ever stored there."""
    if storage.backend == "nats":
        from gateway.spool.nats_dead_letters import NatsArchive

        return NatsArchive(storage)
    from gateway.spool.sqlite_replay import SqliteArchive

    return SqliteArchive(storage.path)


def describe(storage: StorageConfig) -> str:
    """Where the configured backend keeps the calls, in a few words."""
    if storage.backend == "nats" and storage.nats is not None:
        n = storage.nats
        return f"NATS JetStream {n.stream}_CALLS on {', '.join(n.servers)}, replicas {n.replicas}"
    import os

    return os.path.abspath(storage.path)


__all__ = ["CallArchive", "ReplayFilter", "ReplayResult", "open_archive", "Ack", "DeadLetter", "DeadLetterStore", "Pending", "Record", "Spool", "SpoolFull", "StorageFailed",
           "describe", "open_dead_letters", "spool_for", "spool_problems"]
