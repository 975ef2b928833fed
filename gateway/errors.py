"""The JSON body of every error answer (docs/pipelines-api.md, "Error bodies").

``code`` and ``message`` are what the Segment-derived Python SDKs
(customerio-cdp-analytics, rudder-sdk-python) read from any non-2xx answer:
``payload['code']`` and ``payload['message']``.  A body without them raises
``KeyError`` inside the SDK, which it treats as retryable, so a final 400 is
sent again and the good calls of its batch are stored once per attempt.
``error`` and ``reason`` stay for readers of earlier versions.
"""

from __future__ import annotations

from gateway.ingest.call_checks import Rejection

#: seconds a 503 asks the client to wait before it sends again
RETRY_AFTER = "5"


def error_body(reason: str, message: str, **details: object) -> dict[str, object]:
    """``{"code", "message", "error", "reason", **details}``; ``code`` is the
    reason (the metrics label), so one word names the problem everywhere."""
    return {"code": reason, "message": message, "error": message, "reason": reason, **details}


def rejection_body(r: Rejection) -> dict[str, object]:
    """The body for one rejection, with its ``field`` and ``limit`` when known."""
    details: dict[str, object] = {}
    if r.field is not None:
        details["field"] = r.field
    if r.limit is not None:
        details["limit"] = r.limit
    return error_body(r.reason, r.message, **details)
