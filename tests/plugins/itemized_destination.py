"""A test-only destination plugin, loaded through ``plugins: [itemized_destination]``
in a config (tests add this folder to ``sys.path``).

It posts ``{"items": [...]}`` to ``endpoint``, and the API answers 207 with
one result per item, as Track v2's batch does, so each call has its own
outcome.  401/403 raise ``Paused``; an event named ``Unmappable`` is a
``MappingError``.  Its lifecycle hooks record what they were given.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.api import (
    DELIVERED, Destination, Failed, Limits, MappingError, Outcome, Paused, Retry, hookimpl, outcome_for_status,
)

_encode = msgspec.json.Encoder().encode

#: (hook, app) for every lifecycle hook called, in order
LIFECYCLE: list[tuple[str, Any]] = []


class ItemizedDestination(Destination):
    type = "itemized"
    limits = Limits(max_batch_calls=10, max_batch_bytes=100_000, max_call_bytes=4_000,
                    batch_overhead=len(b'{"items":[]}'), rate_requests=1e6)

    class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        endpoint: str
        token: str = "good"

    def prepare(self, call: dict[str, Any]) -> bytes:
        if call.get("event") == "Unmappable":
            raise MappingError("UNMAPPABLE", "this API takes no event named Unmappable")
        props = call.get("properties") or {}
        return _encode({"id": call.get("messageId"), "event": call.get("event"),
                        "behave": props.get("behave", "ok")})

    def batch_body(self, payloads: list[bytes]) -> bytes:
        return b'{"items":[' + b",".join(payloads) + b"]}"

    async def send(self, payloads: list[bytes]) -> list[Outcome]:
        async with self.http.post(self.settings.endpoint, data=self.batch_body(payloads),
                                  headers={"Authorization": f"Bearer {self.settings.token}",
                                           "Content-Type": "application/json"}) as resp:
            text = await resp.text()
            if resp.status in (401, 403):
                raise Paused(f"the API refused the token (HTTP {resp.status})", resp.status, text)
            if resp.status != 207:
                return [outcome_for_status(resp.status, text, resp.headers)] * len(payloads)
            results = msgspec.json.decode(text)["results"]
        out: list[Outcome] = []
        for r in results:
            code, error = r["status"], r.get("error", "")
            if 200 <= code < 300:
                out.append(DELIVERED)
            elif code >= 500 or code == 429:
                out.append(Retry(f"item {code}: {error}", code, error))
            else:
                out.append(Failed(f"item {code}: {error}", code, error))
        return out


@hookimpl
def register_destinations() -> list[type[Destination]]:
    return [ItemizedDestination]


@hookimpl
def startup(app: Any) -> Any:
    async def started() -> None:
        LIFECYCLE.append(("startup", app))
    return started()


@hookimpl
def shutdown(app: Any) -> None:
    LIFECYCLE.append(("shutdown", app))
