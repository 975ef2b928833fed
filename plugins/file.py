"""``file``: every call as one JSON line, appended and fsync'd.

The default config uses it so that the gateway runs out of the box, and it
is the simplest complete example of a destination.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgspec

from gateway.api import DELIVERED, Destination, HttpClient, Limits, Outcome, hookimpl

_encode = msgspec.json.Encoder().encode


class FileDestination(Destination):
    type = "file"
    # A delivery window (5,000 calls, 16 MiB) is one write and one fsync.
    limits = Limits(max_batch_calls=10_000, max_batch_bytes=16 * 1024 * 1024, max_call_bytes=1024 * 1024,
                    batch_overhead=0, rate_requests=1e9)

    class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        path: str
        #: fsync after every batch, so "delivered" means on disk
        fsync: bool = True

    def __init__(self, name: str, settings: Settings, http: HttpClient) -> None:
        super().__init__(name, settings, http)
        self._fd: int | None = None
        self._lock = asyncio.Lock()

    forwards_calls = True

    def prepare(self, call: dict[str, Any]) -> bytes:
        return _encode(call)

    def batch_body(self, payloads: list[bytes]) -> bytes:
        return b"\n".join(payloads) + b"\n"

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            directory = os.path.dirname(self.settings.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            self._fd = os.open(self.settings.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            # A crash can cut a write short: start on a line of our own.
            size = os.fstat(self._fd).st_size
            if size and os.pread(self._fd, 1, size - 1) != b"\n":
                data = b"\n" + data
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        if self.settings.fsync:
            os.fsync(self._fd)

    async def send(self, payloads: list[bytes]) -> list[Outcome]:
        body = self.batch_body(payloads)
        async with self._lock:  # keep whole lines together when batches overlap
            await asyncio.get_running_loop().run_in_executor(None, self._write, body)
        return [DELIVERED] * len(payloads)

    async def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@hookimpl
def register_destinations() -> list[type[Destination]]:
    return [FileDestination]
