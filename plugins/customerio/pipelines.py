"""``customerio_pipelines``: Pipelines calls forwarded unchanged to Customer.io's
Pipelines API (``POST /v1/batch``), context, integrations, messageId and
timestamps included (docs/customerio-apis.md §1).

Requests carry ``X-Strict-Mode: 1`` so that Customer.io answers a bad call with
a 400 or 401 instead of a 200 that silently drops it
(docs/customerio-apis.md §6).  The answer is read by the shared client
(``client``), as the Track destination reads its own: a 400 for a batch is
bisected to find the bad calls, bad credentials pause the destination, 429
and 5xx are retried.  Rule ids (SM-3) are those of docs/customerio-apis.md.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from gateway.api import (
    BODY_EXCERPT, STRIPPED_KEYS, HttpClient, Limits, MappingError, Outcome, Paused, basic_auth, check_call,
)
from plugins.customerio.client import BATCH_OVERHEAD, CustomerioBatchDestination, base_url, check_region

_encode = msgspec.json.Encoder().encode

#: docs/customerio-apis.md §2
REGIONS: dict[str, str] = {"us": "https://cdp.customer.io", "eu": "https://cdp-eu.customer.io"}
BATCH_PATH = "/v1/batch"
#: strict mode may report authentication errors as a 400 (docs/customerio-apis.md §6);
#: a 400 that talks about credentials pauses rather than dead-lettering every call
#: of the backlog one by one
_AUTH_400 = re.compile(r"unauthori[sz]ed|authenticat|(?:api|write)[ _-]?key|credential", re.I)


class CustomerioPipelinesDestination(CustomerioBatchDestination):
    """Customer.io Pipelines API: Basic ``API_KEY:`` (empty password)."""

    type = "customerio_pipelines"
    # docs/customerio-apis.md §5 and §8: 500KB a batch, 32KB a call, 3000 requests per 3 seconds
    limits = Limits(max_batch_calls=100, max_batch_bytes=500_000, max_call_bytes=32_000,
                    batch_overhead=BATCH_OVERHEAD, rate_requests=3000.0, rate_period=3.0)

    class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        #: the API key of an HTTP source in Customer.io (Data Pipelines > Sources)
        api_key: str | int
        region: str = "us"
        #: overrides the region's base URL (tests, proxies)
        endpoint: str | None = None

        def __post_init__(self) -> None:
            self.api_key = str(self.api_key)
            if not self.api_key:
                raise ValueError("api_key is required (the API key of a Customer.io HTTP source)")
            self.region = check_region(self.region)

    def __init__(self, name: str, settings: Settings, http: HttpClient) -> None:
        super().__init__(name, settings, http)
        self.batch_url = base_url(REGIONS, settings.region, settings.endpoint) + BATCH_PATH
        self.headers = {"Content-Type": "application/json", "X-Strict-Mode": "1",
                        "Authorization": basic_auth(str(settings.api_key), "")}

    def prepare(self, call: dict[str, Any]) -> bytes:
        """The call itself.  A call strict mode would refuse (a transform may have
        removed a required field) is dead-lettered here rather than costing a
        rejected request and its bisection (docs/customerio-apis.md §6.2)."""
        problem = check_call(call, None)
        if problem is not None:
            raise MappingError(problem.reason.upper(), problem.message)
        if any(k in call for k in STRIPPED_KEYS):
            call = {k: v for k, v in call.items() if k not in STRIPPED_KEYS}
        return _encode(call)

    def pause_for(self, status: int, text: str) -> Paused | None:
        if status == 400 and _AUTH_400.search(text):
            return Paused("HTTP 400 about authentication: check the API key", status, text[:BODY_EXCERPT])
        return super().pause_for(status, text)

    async def send(self, payloads: list[bytes]) -> list[Outcome]:
        return await self.post_batch(payloads)
