"""gateway-sample-plugin: a third-party destination and transform for the gateway.

Installed next to the gateway (``pip install .``), the ``gateway`` entry point
in pyproject.toml makes every gateway process load this module; config.yaml
can then use ``type: collect`` (a destination) and ``type: redact_emails``
(a transform).  ``gateway check`` lists both under the plugin ``sample``.

Collect is an imaginary API: ``POST {endpoint}/v1/items`` with
``{"items": [...]}`` and a bearer key; it answers ``207`` with one result per
item (``{"results": [{"status": 200}, {"status": 400, "error": "..."}]}``),
``401`` for a bad key, ``429``/``5xx`` when it is busy.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from gateway.api import (
    DELIVERED, Destination, Failed, HttpClient, Limits, MappingError, Outcome, Paused, Retry, Transform, hookimpl,
    outcome_for_status,
)

_encode = msgspec.json.Encoder().encode


class _Result(msgspec.Struct):
    status: int
    error: str = ""


class _Answer(msgspec.Struct):
    results: list[_Result]


_answer = msgspec.json.Decoder(_Answer)


class CollectDestination(Destination):
    """Sends calls to Collect, batched, with one outcome per call."""

    type = "collect"
    #: ``integrations: {"Collect": false}`` reaches every destination of this type
    aliases = ("Collect",)
    #: what one request may hold, and the default client-side rate limit
    limits = Limits(max_batch_calls=50, max_batch_bytes=256_000, max_call_bytes=16_000,
                    batch_overhead=len(b'{"items":[]}'), rate_requests=100, rate_period=1.0)

    class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        api_key: str
        region: Literal["us", "eu"] = "us"
        #: overrides the region's base URL (every destination takes it; tests use it)
        endpoint: str | None = None

    BASE_URLS = {"us": "https://api.collect.example", "eu": "https://eu.api.collect.example"}

    def __init__(self, name: str, settings: Settings, http: HttpClient) -> None:
        super().__init__(name, settings, http)
        base = settings.endpoint or self.BASE_URLS[settings.region]
        self.url = base.rstrip("/") + "/v1/items"
        self.headers = {"Authorization": f"Bearer {settings.api_key}", "Content-Type": "application/json"}

    def prepare(self, call: dict[str, Any]) -> bytes:
        """One call → one Collect item.  MappingError: dead-lettered, never sent."""
        user = call.get("userId") or call.get("anonymousId")
        if not user:
            raise MappingError("NO_USER", "Collect needs a userId or an anonymousId")
        kind = call["type"]
        item: dict[str, Any] = {"id": call.get("messageId"), "user": str(user), "kind": kind,
                                "at": call.get("timestamp")}
        if kind == "track":
            item["name"] = call.get("event")
            item["data"] = call.get("properties") or {}
        elif kind in ("page", "screen"):
            item["name"] = call.get("name")
            item["data"] = call.get("properties") or {}
        elif kind in ("identify", "group"):
            item["data"] = call.get("traits") or {}
            if kind == "group":
                item["group"] = call.get("groupId")
        else:  # alias
            item["previous"] = call.get("previousId")
        return _encode(item)

    def batch_body(self, payloads: list[bytes]) -> bytes:
        # limits.batch_overhead is the length of this envelope
        return b'{"items":[' + b",".join(payloads) + b"]}"

    async def send(self, payloads: list[bytes]) -> list[Outcome]:
        """One request; one outcome per payload, in order.  Network errors are
        left to the engine (it retries the whole batch)."""
        async with self.http.post(self.url, data=self.batch_body(payloads), headers=self.headers) as resp:
            text = await resp.text(errors="replace")
            if resp.status in (401, 403):
                # Every call would fail the same way: keep them queued, pause, alert.
                raise Paused(f"Collect refused the API key (HTTP {resp.status})", resp.status, text)
            if resp.status != 207:
                # One answer for the whole request: 2xx, retryable or permanent.
                return [outcome_for_status(resp.status, text, resp.headers)] * len(payloads)
        try:
            results = _answer.decode(text).results
        except msgspec.DecodeError:
            return [Retry("Collect answered 207 without results", 207, text[:500])] * len(payloads)
        if len(results) != len(payloads):
            return [Retry(f"Collect answered {len(results)} results for {len(payloads)} items", 207,
                          text[:500])] * len(payloads)
        out: list[Outcome] = []
        for r in results:
            if 200 <= r.status < 300:
                out.append(DELIVERED)
            elif r.status == 429 or r.status >= 500:
                out.append(Retry(f"item {r.status}: {r.error}", r.status, r.error))
            else:
                out.append(Failed(f"item {r.status}: {r.error}", r.status, r.error))
        return out


class RedactEmails(Transform):
    """Replaces email addresses in the top-level values of ``properties`` and
    ``traits``; with ``drop: true`` a call that had one is dropped instead."""

    type = "redact_emails"
    EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}")

    class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        replacement: str = "[redacted]"
        drop: bool = False

    @property
    def drop_reason(self) -> str:
        return "transform:redact_emails"

    def apply(self, call: dict[str, Any]) -> dict[str, Any] | None:
        found = False
        for key in ("properties", "traits"):
            values = call.get(key)
            if not isinstance(values, dict):
                continue
            for name, value in values.items():
                if isinstance(value, str) and self.EMAIL.search(value):
                    found = True
                    values[name] = self.EMAIL.sub(self.settings.replacement, value)
        return None if found and self.settings.drop else call


@hookimpl
def register_destinations() -> list[type[Destination]]:
    return [CollectDestination]


@hookimpl
def register_transforms() -> list[type[Transform]]:
    return [RedactEmails]
