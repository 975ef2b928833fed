"""Free space on the spool's filesystem, checked cheaply, against a reserve.

SQLite that meets a full disk cannot store an acknowledgement, a cursor
move or even the deletion that would make room, and the gateway wedges. So
new calls are refused (503 + Retry-After) while the free space is below a
reserve, ``storage.min_free_bytes``: what delivery writes to record its
progress then always has room.  Free pages inside the spool file count as
free, since SQLite reuses them before it grows the file: without that, a
purge would never be seen to make room.  What the WAL holds counts as
taken twice, since its checkpoint grows the spool file by as much: a burst
of appends fills the WAL faster than checkpoints empty it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from gateway.units import human_size

#: ``auto``: this share of the filesystem, within the bounds below
AUTO_SHARE = 0.05
AUTO_MIN = 4 << 20
AUTO_MAX = 1 << 30
#: seconds between looks at the filesystem (one statvfs, one stat, one PRAGMA)
LOOK_EVERY = 0.25
#: and bytes appended between looks, at most
LOOK_AFTER_BYTES = 1 << 20
#: disk an appended byte takes, at most: the WAL's frames, the table's pages, the messageId index
OVERHEAD = 2


def auto_reserve(total: int) -> int:
    """The reserve of a filesystem of ``total`` bytes: 5%, at least 4 MiB
    (a 40 MB disk still takes calls until 90% full), at most 1 GiB, and never
    more than half of the filesystem."""
    return int(min(AUTO_MAX, max(AUTO_MIN, total * AUTO_SHARE), total // 2))


class DiskRoom:
    """The free bytes of a directory's filesystem, refreshed at most every
    LOOK_EVERY seconds; appends in between are subtracted, so a burst cannot
    run past the reserve unseen."""

    def __init__(self, directory: Path, reserve: int, reusable: Callable[[], int] = lambda: 0,
                 wal: Path | None = None) -> None:
        self.directory = directory
        self.wal = wal
        self.configured = reserve  # -1: auto
        self.reusable = reusable
        self.reserve = 0
        self.free = 0
        self._looked = 0.0
        self._since = 0  # bytes appended since the last look

    def look(self) -> int:
        st = os.statvfs(self.directory)
        total = st.f_blocks * st.f_frsize
        self.reserve = auto_reserve(total) if self.configured < 0 else self.configured
        self.free = st.f_bavail * st.f_frsize + self.reusable() - self._wal_size()
        self._looked = time.monotonic()
        self._since = 0
        return self.free

    def _wal_size(self) -> int:
        try:
            return os.stat(self.wal).st_size if self.wal is not None else 0
        except FileNotFoundError:
            return 0

    def left(self) -> int:
        """Free bytes now, as far as can be known without a system call."""
        if self._since >= LOOK_AFTER_BYTES or time.monotonic() - self._looked >= LOOK_EVERY:
            try:
                self.look()
            except OSError:
                pass
        return self.free - self._since

    def take(self, size: int) -> str | None:
        """``problem(size)``; when there is none, the bytes are counted as taken.

        Called on every append: between looks it answers from the counters
        alone, without the calls ``problem`` makes."""
        since = self._since
        if not (since < LOOK_AFTER_BYTES and time.monotonic() - self._looked < LOOK_EVERY
                and self.free - since - size >= self.reserve):
            problem = self.problem(size)
            if problem is not None:
                return problem
        self._since += size * OVERHEAD
        return None

    def problem(self, size: int) -> str | None:
        """Why ``size`` more bytes may not be taken now, if they may not."""
        left = self.left()
        if left - size < self.reserve:
            return (f"free space on the spool's filesystem is {human_size(max(0, left))}, below the "
                    f"{human_size(self.reserve)} kept for bookkeeping (storage.min_free_bytes)")
        return None
