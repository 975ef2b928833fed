"""What the gateway adds to every call before it is stored: a messageId,
receivedAt, the corrected timestamp, context.ip and the batch's context."""

from __future__ import annotations

import itertools
import os
from typing import Any

from gateway.events import STRIPPED_KEYS
from gateway.ingest.call_checks import Rejection
from gateway.ingest.timestamps import iso_ms, parse_ms


_message_ids = itertools.count()
_MESSAGE_ID_PREFIX = os.urandom(6).hex()


def new_message_id() -> str:
    """Unique across processes and restarts: a random per-process prefix and a counter."""
    return f"gw-{_MESSAGE_ID_PREFIX}-{next(_message_ids):x}"


class Enricher:
    """What the gateway adds to every call (docs/pipelines-api.md, "Enrichment and timestamps").

    Times are kept as integer milliseconds: a batch of a hundred calls then
    costs a hundred subtractions, not a hundred datetime round trips."""

    __slots__ = ("received_ms", "received_iso", "ip", "context", "integrations", "sent_at", "_sent_cache")

    def __init__(self, received_ms: int, ip: str | None,
                 context: dict[str, Any] | None = None, integrations: dict[str, Any] | None = None,
                 sent_at: Any = None) -> None:
        self.received_ms = received_ms
        self.received_iso = iso_ms(self.received_ms)
        self.ip = ip
        self.context = context
        self.integrations = integrations
        self.sent_at = sent_at
        self._sent_cache: tuple[Any, int | None] = (None, None)

    def _sent(self, value: Any) -> int | None:
        if self._sent_cache[0] != value:
            self._sent_cache = (value, parse_ms(value))
        return self._sent_cache[1]

    def apply(self, call: dict[str, Any], type_: str | None) -> Rejection | None:
        """Enrich ``call`` in place; a timestamp that is not ISO-8601 rejects it."""
        for key in STRIPPED_KEYS:
            if key in call:
                del call[key]
        if type_:
            call["type"] = type_
        if not call.get("messageId"):
            call["messageId"] = new_message_id()
        call["receivedAt"] = self.received_iso
        ctx = call.get("context")
        if ctx is None:
            ctx = call["context"] = {}
        if self.context:
            for k, v in self.context.items():
                ctx.setdefault(k, v)
        if self.ip and "ip" not in ctx:
            ctx["ip"] = self.ip
        if self.integrations:
            integ = call.get("integrations")
            if integ is None:
                call["integrations"] = dict(self.integrations)
            else:
                for k, v in self.integrations.items():
                    integ.setdefault(k, v)
        if call.get("type") == "identify" and call.get("traits") is None:
            traits = ctx.get("traits")
            if isinstance(traits, dict):
                call["traits"] = dict(traits)
        sent_raw = call.get("sentAt")
        if sent_raw is None and self.sent_at is not None:
            sent_raw = call["sentAt"] = self.sent_at
        sent = None
        if sent_raw is not None:
            sent = self._sent(sent_raw)
            if sent is None:
                return Rejection("bad_field", "sentAt must be an ISO-8601 date-time", "sentAt")
        key = "timestamp"
        client_raw = call.get("timestamp")
        if client_raw is None:
            key = "originalTimestamp"
            client_raw = call.get("originalTimestamp")
        if client_raw is None:
            call["timestamp"] = self.received_iso
            return None
        client = parse_ms(client_raw)
        if client is None:
            return Rejection("bad_field", f"{key} must be an ISO-8601 date-time", key)
        if "originalTimestamp" not in call:
            call["originalTimestamp"] = client_raw
        call["timestamp"] = iso_ms(self.received_ms - (sent - client)) if sent is not None else client_raw
        return None
