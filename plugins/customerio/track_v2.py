"""``customerio_track``: Pipelines calls mapped to Customer.io Track API v2 ops
and sent to ``POST /api/v2/batch`` (docs/customerio-track-v2.md, whose rule
ids, such as B-4, this file uses).

``prepare`` maps one call (``track_mapping``), checks the op's limits
(``track_limits``) and encodes it once; ``send`` packs the ops of a batch
into requests that never put a merge next to an identify of its primary,
posts them with the shared client (``client``), and sends delivery metrics
v2 cannot carry to the v1 metrics endpoint, one request each.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.api import (
    BODY_EXCERPT, DELIVERED, Failed, HttpClient, Limits, MappingError, Outcome, Retry, basic_auth,
    outcome_for_status,
)
from plugins.customerio.client import BATCH_OVERHEAD, CustomerioBatchDestination, base_url
from plugins.customerio.track_limits import MAX_BATCH_BYTES, MAX_OP_BYTES, check_limits
from plugins.customerio.track_mapping import TrackV2Mapping, TrackV2Settings

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

#: docs/customerio-apis.md §2
REGIONS: dict[str, str] = {"us": "https://track.customer.io", "eu": "https://track-eu.customer.io"}
BATCH_PATH = "/api/v2/batch"
METRICS_PATH = "/api/v1/metrics"

#: what a v1 metrics payload starts with; every v2 op starts with '{"type":'
_V1_PREFIX = b'{"delivery_id":'
_MERGE_PREFIX = b'{"type":"person","action":"merge",'
_IDENTIFY_PREFIX = b'{"type":"person","action":"identify",'


class CustomerioTrackDestination(CustomerioBatchDestination):
    """Customer.io Track API v2, ``POST /api/v2/batch`` with Basic SITE_ID:API_KEY."""

    type = "customerio_track"
    # docs/customerio-apis.md §5 and §8: 32,000-byte ops, 500,000-byte bodies, 1000 requests/s
    limits = Limits(max_batch_calls=100, max_batch_bytes=MAX_BATCH_BYTES, max_call_bytes=MAX_OP_BYTES,
                    batch_overhead=BATCH_OVERHEAD, rate_requests=1000.0, rate_period=1.0)

    Settings = TrackV2Settings

    def __init__(self, name: str, settings: TrackV2Settings, http: HttpClient) -> None:
        super().__init__(name, settings, http)
        base = base_url(REGIONS, settings.region, settings.endpoint)
        self.batch_url = base + BATCH_PATH
        self.metrics_url = base + METRICS_PATH
        self.headers = {"Content-Type": "application/json",
                        "Authorization": basic_auth(str(settings.site_id), str(settings.api_key))}
        # the engine reads the instance's limits
        self.limits = msgspec.structs.replace(type(self).limits, max_batch_calls=settings.max_ops_per_batch)
        self.mapping = TrackV2Mapping(settings)

    def prepare(self, call: dict[str, Any]) -> bytes:
        """One call → one Track v2 op, checked against docs/customerio-track-v2.md §6.1
        and encoded compactly."""
        op = self.mapping.op_of(call)
        if "delivery_id" not in op:
            check_limits(op)
        data = _encode(op)
        if len(data) > MAX_OP_BYTES:
            raise MappingError("LIMIT_EXCEEDED", f"the op is {len(data)} bytes; the limit is {MAX_OP_BYTES}")
        return data

    async def send(self, payloads: list[bytes]) -> list[Outcome]:
        """v2 ops in as few requests as the merge rule allows, in order; v1 metrics
        one request each (docs/customerio-track-v2.md §6.2)."""
        outcomes: list[Outcome] = [DELIVERED] * len(payloads)
        v2 = [i for i, p in enumerate(payloads) if not p.startswith(_V1_PREFIX)]
        held: Retry | None = None
        for part in _merge_safe_parts(payloads, v2):
            if held is not None:  # B-4: an earlier part failed: keep the order, send nothing after it
                for i in part:
                    outcomes[i] = held
                continue
            results = await self.post_batch([payloads[i] for i in part])
            for i, oc in zip(part, results):
                outcomes[i] = oc
            failed = next((oc for oc in results if isinstance(oc, Retry)), None)
            if failed is not None:
                held = Retry(f"held back behind a failed request: {failed.reason}", failed.status, failed.body,
                             failed.retry_after)
        for i, p in enumerate(payloads):
            if p.startswith(_V1_PREFIX):
                outcomes[i] = await self._post_metric(p)
        return outcomes

    async def _post_metric(self, payload: bytes) -> Outcome:
        """One unbatched v1 metrics request, its answer read as docs/customerio-apis.md §9 says."""
        async with self.http.post(self.metrics_url, data=payload, headers=self.headers) as resp:
            text = await resp.text(errors="replace")
            outcome = outcome_for_status(resp.status, text, resp.headers)
        paused = self.pause_for(resp.status, text)
        if paused is not None:
            raise paused
        if resp.status == 413:
            return Failed("LIMIT_EXCEEDED: HTTP 413", 413, text[:BODY_EXCERPT])
        return outcome


def _merge_safe_parts(payloads: list[bytes], indexes: list[int]) -> list[list[int]]:
    """docs/customerio-track-v2.md §6.2 B-3: never a merge in the same request as an
    identify of its primary.  Only batches holding a merge are decoded; a new
    request starts where needed."""
    if not any(payloads[i].startswith(_MERGE_PREFIX) for i in indexes):
        return [indexes] if indexes else []
    parts: list[list[int]] = []
    cur: list[int] = []
    identified: set[bytes] = set()  # identify identifiers in cur
    primaries: set[bytes] = set()  # merge primaries in cur
    for i in indexes:
        p = payloads[i]
        key: bytes | None = None
        if p.startswith(_MERGE_PREFIX):
            key = _encode(_decode(p)["primary"])
            clash = key in identified
        elif p.startswith(_IDENTIFY_PREFIX):
            key = _encode(_decode(p)["identifiers"])
            clash = key in primaries
        else:
            clash = False
        if clash:
            parts.append(cur)
            cur, identified, primaries = [], set(), set()
        cur.append(i)
        if key is not None:
            (primaries if p.startswith(_MERGE_PREFIX) else identified).add(key)
    if cur:
        parts.append(cur)
    return parts
