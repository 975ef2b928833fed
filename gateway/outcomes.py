"""What a destination reports for each call it was asked to send, and the
usual reading of an HTTP answer into those outcomes.

Outcomes are per call, so one bad call never costs its neighbours (Segment's
``performBatch``); what to do with each (retry when, dead-letter why) is the
engine's policy, not the destination's (Vector's retry layer).
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

import msgspec


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
#: characters of an answer's body kept with a retry or a dead letter
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


def outcome_for_status(status: int, body: str, headers: Any = None) -> Outcome:
    """The usual reading of an HTTP answer that covers a whole request:
    2xx delivered; 5xx, 408 and 429 retried (with ``Retry-After``); other
    statuses failed for good."""
    excerpt = body[:BODY_EXCERPT]
    if 200 <= status < 300:
        return DELIVERED
    if status >= 500 or status in RETRYABLE_STATUSES:
        retry_after = parse_retry_after(headers.get("Retry-After")) if headers else None
        return Retry(f"HTTP {status}", status, excerpt, retry_after)
    return Failed(f"HTTP {status}", status, excerpt)
