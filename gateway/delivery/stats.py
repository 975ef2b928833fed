"""What a destination's delivery counts (metrics.py reads it at scrape
time), and the backoff of its retries."""

from __future__ import annotations

import random
import time

import msgspec

from gateway.config import RetryConfig
from gateway.outcomes import BODY_EXCERPT


class LastError(msgspec.Struct):
    """A destination's latest failure, for the debugger's status panel."""

    at: float
    reason: str
    status: int | None = None
    excerpt: str = ""
    messageId: str | None = None


class Stats:
    """Counters of one destination; the core keeps plain ints and dicts."""

    def __init__(self) -> None:
        self.delivered = 0
        self.retried = 0
        #: calls queued again by ``gateway replay`` or ``gateway dlq replay``, as they come due
        self.replayed = 0
        self.dead: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.paused = False
        self.backlog = 0
        self.retry_backlog = 0
        self.oldest: float | None = None
        self.last_error: LastError | None = None

    def error(self, reason: str, status: int | None, body: str, message_id: str | None = None) -> None:
        """Remember the latest failure (a retry, a pause or a dead letter)."""
        self.last_error = LastError(time.time(), reason, status, body[:BODY_EXCERPT], message_id or None)

    def count(self, table: dict[str, int], key: str, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n


def reason_label(reason: str, status: int | None = None) -> str:
    """A bounded label for metrics: ``http_<status>``, ``retries_exhausted``,
    or the reason's code (``LIMIT_EXCEEDED``, ``MAPPING_FAILED``)."""
    if reason.startswith("gave up after"):
        return "retries_exhausted"
    if status is not None:
        return f"http_{status}"
    head = reason.split(":", 1)[0].split(" ", 1)[0]
    return head[:40] or "unknown"


def backoff(policy: RetryConfig, attempts: int) -> float:
    """Exponential backoff with full jitter (AWS's "full jitter")."""
    return random.uniform(0, min(policy.backoff_cap, policy.backoff_base * 2 ** max(0, attempts - 1)))
