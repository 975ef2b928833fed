"""The contract between the delivery engine and a destination plugin.

A destination type is a class.  The engine builds one object per configured
destination, once, and then calls ``prepare`` for every call routed to it and
``send`` for every batch.  Outcomes are reported per call so that one bad call
never costs its neighbours (Segment's ``performBatch``; Vector's retry policy
lives in the engine, not in sinks).
"""

from __future__ import annotations

import base64
import email.utils
import time
from typing import Any, ClassVar

import aiohttp
import msgspec


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


class MappingError(Exception):
    """A call this destination can never accept: dead-lettered, never sent."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Delivered(msgspec.Struct, frozen=True):
    """The destination accepted the call."""


class Retry(msgspec.Struct, frozen=True):
    """A transient failure: send the call again later."""

    reason: str
    status: int | None = None
    body: str = ""
    retry_after: float | None = None


class Failed(msgspec.Struct, frozen=True):
    """A permanent failure: the call goes to the dead-letter store."""

    reason: str
    status: int | None = None
    body: str = ""


Outcome = Delivered | Retry | Failed
DELIVERED = Delivered()


class Paused(Exception):
    """The destination cannot take anything until a person acts (bad key, wrong
    region).  The engine keeps the batch queued, stops sending for a while and
    raises an alert instead of filling the dead-letter store."""

    def __init__(self, reason: str, status: int | None = None, body: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.body = body


RETRYABLE_STATUSES = frozenset({408, 429})
BODY_EXCERPT = 500


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now; it may be seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def basic_auth(username: str, password: str = "") -> str:
    """An ``Authorization: Basic`` header value (aiohttp 3.14 deprecates ``BasicAuth``)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def outcome_for_status(status: int, body: str, headers: Any = None) -> Outcome:
    """The usual reading of an HTTP answer that covers a whole request."""
    excerpt = body[:BODY_EXCERPT]
    if 200 <= status < 300:
        return DELIVERED
    if status >= 500 or status in RETRYABLE_STATUSES:
        retry_after = parse_retry_after(headers.get("Retry-After")) if headers else None
        return Retry(f"HTTP {status}", status, excerpt, retry_after)
    return Failed(f"HTTP {status}", status, excerpt)


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

    def __init__(self, name: str, settings: Any, http: aiohttp.ClientSession | None) -> None:
        self.name = name
        self.settings = settings
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

    async def throttle(self) -> None:
        """Wait for the destination's rate limit.  The engine takes a turn
        before each ``send``; a send that makes more than one request (a
        split, a bisection) awaits this before each further one.  The engine
        replaces it with its own limiter."""

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
