"""What both Customer.io destinations share: one POST of a ``{"batch": [...]}``
body and the reading of Customer.io's answer (docs/customerio-apis.md §7).

A 2xx may still fail single items (``errors`` with a ``batch_index``); a 400
accepts nothing, so a batch is bisected to find the calls it refuses; a 413
is halved; bad credentials or a wrong host pause the destination rather than
dead-letter the backlog; 408, 429 and 5xx are retried by the engine.  Every
request, the extra ones of a bisection included, goes through ``self.http``,
which waits for the destination's rate-limit turn.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import msgspec

from gateway.api import BODY_EXCERPT, DELIVERED, Destination, Failed, Outcome, Paused, outcome_for_status

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

#: what ``{"batch":[...]}`` adds around the comma-joined payloads
BATCH_OVERHEAD = len(b'{"batch":[]}')


def check_region(region: str) -> str:
    """``us`` or ``eu`` in any case: the regions both Customer.io APIs have
    (docs/customerio-apis.md §2)."""
    normal = region.strip().lower()
    if normal not in ("us", "eu"):
        raise ValueError(f"region must be us or eu, got {region!r}")
    return normal


def base_url(regions: dict[str, str], region: str, endpoint: str | None) -> str:
    """The region's host, or ``endpoint`` when set (tests, proxies), without a trailing slash."""
    return (endpoint or regions[region]).rstrip("/")


class CustomerioBatchDestination(Destination):
    """POSTs ``{"batch": [...]}`` and reads Customer.io's answer per item.

    Subclasses set ``batch_url`` and ``headers`` (with Authorization) in ``__init__``."""

    batch_url: str
    headers: dict[str, str]
    #: statuses that mean "fix the settings": nothing can get through (docs/customerio-apis.md §7)
    pause_statuses: ClassVar[frozenset[int]] = frozenset({401, 403, 404})

    def batch_body(self, payloads: list[bytes]) -> bytes:
        return b'{"batch":[' + b",".join(payloads) + b"]}"

    def pause_for(self, status: int, text: str) -> Paused | None:
        """The Paused to raise for this answer, or None."""
        if status in self.pause_statuses:
            hint = "check the API credentials" if status != 404 else "check region and endpoint"
            return Paused(f"HTTP {status}: {hint}", status, text[:BODY_EXCERPT])
        return None

    async def post_batch(self, payloads: list[bytes]) -> list[Outcome]:
        """One request, split further when Customer.io refuses it whole:
        a 400 is bisected to find the bad calls, a 413 halved."""
        async with self.http.post(self.batch_url, data=self.batch_body(payloads), headers=self.headers) as resp:
            status = resp.status
            text = await resp.text(errors="replace")
            whole = outcome_for_status(status, text, resp.headers)
        n = len(payloads)
        if 200 <= status < 300:
            return item_outcomes(status, text, n)
        paused = self.pause_for(status, text)
        if paused is not None:
            raise paused
        if status in (400, 413) and n > 1:
            if status == 400:
                log.warning("%s: HTTP 400 for a batch of %d calls; bisecting to find the bad ones "
                            "(a mapping bug if it is ours): %s", self.name, n, text[:200])
            mid = n // 2
            return await self.post_batch(payloads[:mid]) + await self.post_batch(payloads[mid:])
        if status == 413:
            return [Failed(f"LIMIT_EXCEEDED: HTTP 413 for a single call of {len(payloads[0])} bytes",
                           status, text[:BODY_EXCERPT])]
        return [whole] * n


def item_outcomes(status: int, text: str, n: int) -> list[Outcome]:
    """A 2xx answer: every call is delivered except those a valid ``batch_index``
    names in ``errors``, which are permanent failures; other errors are logged
    (docs/customerio-apis.md §7.2)."""
    outcomes: list[Outcome] = [DELIVERED] * n
    try:
        doc: Any = _decode(text) if text.strip() else None
    except msgspec.DecodeError:
        doc = None
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not errors or not isinstance(errors, list):
        return outcomes
    for err in errors:
        i = err.get("batch_index") if isinstance(err, dict) else None
        if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n:
            message = err.get("message") or err.get("reason") or "rejected"
            field = err.get("field")
            reason = f"HTTP {status}: {message}" + (f" (field: {field})" if field else "")
            outcomes[i] = Failed(reason, status, _encode(err).decode()[:BODY_EXCERPT])
        else:
            log.warning("HTTP %d: an error without a valid batch_index (%d ops): %r", status, n, err)
    return outcomes
