"""What one stored call becomes for one destination: routed away, dropped
by a transform, dead-lettered (it can never be mapped) or a payload to send.

The planner does no I/O, so ``gateway explain`` uses it alone to show what
each destination would receive.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from gateway.config import DestinationConfig
from gateway.events import call_decoder
from gateway.outcomes import MappingError
from gateway.plugin_classes import Destination, Transform
from gateway.routing import Route

log = logging.getLogger("gateway.delivery")


class Plan(msgspec.Struct):
    """What one call becomes for one destination."""

    payload: bytes | None = None
    refused: str | None = None  # routing said no (not an error)
    dropped: str | None = None  # a transform dropped it
    error: str | None = None  # permanent: goes to the dead-letter store
    call: dict[str, Any] | None = None

    @property
    def skip_reason(self) -> str:
        """The metrics label of a call that is not sent and not an error."""
        return "routing" if self.refused else self.dropped or "dropped"


class RouteView(msgspec.Struct):
    """The fields routing reads; msgspec skips the rest of the call unparsed."""

    type: Any = None
    event: Any = None
    integrations: Any = None
    messageId: Any = None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


route_view_decoder = msgspec.json.Decoder(RouteView)


def message_id_of(data: bytes) -> str:
    """A stored call's messageId, read without decoding the rest of it."""
    try:
        mid = route_view_decoder.decode(data).messageId
    except msgspec.DecodeError:
        return ""
    return str(mid) if mid is not None else ""


class Planner:
    """Routing, the destination's transforms and its ``prepare``, for one destination."""

    def __init__(self, dc: DestinationConfig, dest: Destination, transforms: list[Transform]) -> None:
        self.name = dc.name
        self.dest = dest
        self.transforms = transforms
        self.route = Route([dc.name, *dc.aliases, *dest.aliases], dc.filter)
        #: the stored bytes are the payload unless routing or size says otherwise
        self.passthrough = dest.forwards_calls and not transforms
        lim = dest.limits
        self.max_batch_bytes = min(dc.batch.max_bytes or lim.max_batch_bytes, lim.max_batch_bytes)
        self.max_call = min(lim.max_call_bytes, self.max_batch_bytes - lim.batch_overhead)

    def as_stored(self, data: bytes) -> bool:
        """Whether the stored bytes are the payload with nothing to read: a
        destination that forwards calls, no route that could refuse it, in size."""
        return (self.passthrough and self.route.open and len(data) <= self.max_call
                and b'"integrations"' not in data)

    def _too_big(self, size: int) -> str:
        return f"LIMIT_EXCEEDED: payload is {size} bytes; the destination takes {self.max_call} a call"

    def plan(self, data: bytes | dict[str, Any], source: str) -> Plan:
        try:
            if self.passthrough and isinstance(data, bytes):
                # The destination sends calls as stored: read only what routing
                # needs, and nothing at all when nothing could route it away.
                if self.as_stored(data):
                    return Plan(payload=data)
                view = route_view_decoder.decode(data)
                refused = self.route.refuse(view, source)  # type: ignore[arg-type]
                if refused is not None:
                    return Plan(refused=refused, call={"messageId": view.messageId})
                if len(data) > self.max_call:
                    return Plan(error=self._too_big(len(data)), call={"messageId": view.messageId})
                return Plan(payload=data, call={"messageId": view.messageId})
            call = call_decoder.decode(data) if isinstance(data, bytes) else data
        except msgspec.DecodeError as e:  # only a damaged spool row could do this
            return Plan(error=f"UNREADABLE: {e}")
        refused = self.route.refuse(call, source)
        if refused is not None:
            return Plan(refused=refused, call=call)
        for t in self.transforms:
            out = t.apply(call)
            if out is None:
                return Plan(dropped=t.drop_reason, call=call)
            call = out
        try:
            payload = self.dest.prepare(call)
        except MappingError as e:
            return Plan(error=f"{e.code}: {e.message}", call=call)
        except Exception as e:  # noqa: BLE001 - a plugin bug must not stop the queue
            log.exception("%s: prepare failed", self.name)
            return Plan(error=f"MAPPING_FAILED: {type(e).__name__}: {e}", call=call)
        if len(payload) > self.max_call:
            return Plan(error=self._too_big(len(payload)), call=call)
        return Plan(payload=payload, call=call)
