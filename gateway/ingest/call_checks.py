"""Whether one call is a Pipelines call: the required fields by type and the
shapes of the fields the gateway reads (docs/pipelines-api.md, "Required
fields by call type").  A forwarding destination runs the same checks before
it sends."""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.events import CALL_TYPES, NEEDS_PERSON, OBJECT_KEYS
from gateway.units import shown


class Rejection(msgspec.Struct, omit_defaults=True):
    """Why one call, or a whole request, was not stored."""

    reason: str  # the metrics label: auth, encoding, size, json, missing_field, ...
    message: str
    field: str | None = None
    limit: int | None = None
    index: int | None = None


class RequestRejected(Exception):
    """The whole request is unusable (auth, encoding, size, JSON)."""

    def __init__(self, status: int, rejection: Rejection) -> None:
        super().__init__(rejection.message)
        self.status = status
        self.rejection = rejection


def _present(value: Any) -> bool:
    """An identifier counts when it is a non-empty string or a number."""
    if isinstance(value, str):
        return value != ""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_call(call: Any, type_: str | None) -> Rejection | None:
    """The seed's required fields (pipelines-vs-track-api.txt), plus shape checks."""
    if not isinstance(call, dict):
        return Rejection("json", "a call must be a JSON object", "")
    t = type_ or call.get("type")
    if not (isinstance(t, str) and t in CALL_TYPES):  # a list or an object cannot even be looked up
        if t is None:
            return Rejection("missing_field", "type is required in a batch call", "type")
        return Rejection("bad_type", f"type must be one of {', '.join(sorted(CALL_TYPES))}; got {shown(t)}",
                         "type")
    for key in OBJECT_KEYS:
        v = call.get(key)
        if v is not None and not isinstance(v, dict):
            return Rejection("bad_field", f"{key} must be an object", key)
    for key in ("userId", "anonymousId", "groupId", "previousId"):
        v = call.get(key)
        if v is not None and not isinstance(v, str) and not _present(v):
            return Rejection("bad_field", f"{key} must be a string", key)
    if t in NEEDS_PERSON and not (_present(call.get("userId")) or _present(call.get("anonymousId"))):
        return Rejection("missing_field", f"{t} requires userId or anonymousId", "userId")
    if t == "track":
        ev = call.get("event")
        if not isinstance(ev, str) or not ev:
            return Rejection("missing_field", "track requires an event name", "event")
    elif t == "group" and not _present(call.get("groupId")):
        return Rejection("missing_field", "group requires groupId", "groupId")
    elif t == "alias" and not _present(call.get("previousId")):
        return Rejection("missing_field", "alias requires previousId", "previousId")
    return None
