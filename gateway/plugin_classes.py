"""The classes a plugin subclasses: ``Destination`` and ``Transform``.

The engine builds one object per configured destination or transform, once,
with everything it needs (its settings, and for a destination its rate-limited
HTTP client), then calls it directly for every call: ``prepare`` and
``send`` for a destination, ``apply`` for a transform.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from gateway.http_client import HttpClient
from gateway.outcomes import Outcome


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """What one request to the destination's API may hold."""

    max_batch_calls: int = 100
    max_batch_bytes: int = 500_000
    max_call_bytes: int = 32_000
    #: bytes the batch envelope adds around the comma-joined payloads
    batch_overhead: int = 2
    #: default client-side rate limit: ``rate_requests`` per ``rate_period`` s
    rate_requests: float = 1000.0
    rate_period: float = 1.0


class Destination:
    """Base class of destination types.

    Subclasses set ``type`` (the ``type:`` string in config.yaml), ``Settings``
    (a msgspec Struct; unknown keys are errors naming the key) and ``limits``,
    and implement ``prepare`` and ``send``.  ``aliases`` are extra names the
    ``integrations`` object may use for every destination of this type.
    """

    type: ClassVar[str]
    Settings: ClassVar[type[msgspec.Struct]]
    #: the type's limits; an object may narrow its own from its settings
    limits: Limits = Limits()
    aliases: ClassVar[tuple[str, ...]] = ()
    #: True when ``prepare`` returns the call exactly as stored (JSON-encoded,
    #: unchanged): the engine then sends the stored bytes without decoding
    #: them, unless destination transforms change the call.
    forwards_calls: ClassVar[bool] = False

    def __init__(self, name: str, settings: Any, http: HttpClient) -> None:
        self.name = name
        self.settings = settings
        #: every request through it waits for this destination's rate limit
        self.http = http

    def batch_body(self, payloads: list[bytes]) -> bytes:
        """The request body for a batch; the engine sizes batches with
        ``limits.batch_overhead`` plus one comma between payloads."""
        return b"[" + b",".join(payloads) + b"]"

    def prepare(self, call: dict[str, Any]) -> bytes:
        """Map one call to its payload, or raise MappingError."""
        raise NotImplementedError

    async def send(self, payloads: list[bytes]) -> list[Outcome]:
        """Send one batch; one outcome per payload, in order.  Raising an
        ``aiohttp.ClientError`` or ``asyncio.TimeoutError`` retries the whole
        batch; raising ``Paused`` keeps it queued and pauses the destination."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the object holds (files, sockets)."""


class Transform:
    """Base class of transform types: ``apply`` returns the call (changed in
    place or new) or ``None`` to drop it; ``drop_reason`` names why."""

    type: ClassVar[str]
    Settings: ClassVar[type[msgspec.Struct]]

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    @property
    def drop_reason(self) -> str:
        return f"transform:{self.type}"

    def apply(self, call: dict[str, Any]) -> dict[str, Any] | None:
        raise NotImplementedError
