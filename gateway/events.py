"""The Pipelines calls as they arrive on the wire.

Calls stay dicts from decode to spool: the Pipelines destination forwards
calls as sent, so keys this gateway does not know (``channel``, ``version``,
an SDK's own fields) must survive.  The batch envelope is a Struct, so a
wrong shape is reported with its path; its calls are checked one by one, so
one bad call never costs the others.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

CALL_TYPES: Final = frozenset({"identify", "track", "page", "screen", "group", "alias"})

#: path segment → call type (long and browser short forms)
PATH_TYPES: Final = {
    "identify": "identify", "i": "identify",
    "track": "track", "t": "track",
    "page": "page", "p": "page",
    "screen": "screen", "s": "screen",
    "group": "group", "g": "group",
    "alias": "alias", "a": "alias",
}
BATCH_PATHS: Final = frozenset({"batch", "import", "b"})

#: types that need userId or anonymousId (docs/pipelines-api.md,
#: "Required fields by call type")
NEEDS_PERSON: Final = frozenset({"identify", "track", "page", "screen", "alias"})

#: keys a client may send that are never stored or passed on
STRIPPED_KEYS: Final = ("writeKey", "_metadata")

#: keys that must be JSON objects when present
OBJECT_KEYS: Final = ("context", "integrations", "properties", "traits")


class BatchEnvelope(msgspec.Struct):
    """``POST /v1/batch`` (and ``/v1/import``, ``/v1/b``)."""

    batch: list[msgspec.Raw]
    context: dict[str, Any] | None = None
    integrations: dict[str, Any] | None = None
    sentAt: Any = None
    writeKey: Any = None


batch_decoder: Final = msgspec.json.Decoder(BatchEnvelope)
call_decoder: Final = msgspec.json.Decoder(dict[str, Any])
encoder: Final = msgspec.json.Encoder()


class CallSummary(msgspec.Struct):
    """The fields of a call that say what it is; the rest is skipped unparsed."""

    type: Any = None
    event: Any = None
    messageId: Any = None
    userId: Any = None
    anonymousId: Any = None


_summary = msgspec.json.Decoder(CallSummary)


def summarize(data: bytes) -> dict[str, Any]:
    """type, event, messageId and userId of a stored call."""
    try:
        s = _summary.decode(data)
    except msgspec.DecodeError:
        return {}
    out = {"type": s.type, "event": s.event, "messageId": s.messageId,
           "userId": s.userId if s.userId is not None else s.anonymousId}
    return {k: v for k, v in out.items() if v is not None}
