"""``webhook``: the Pipelines batch (``{"batch": [call, ...]}``) POSTed to any URL."""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.api import Destination, HttpClient, Limits, Outcome, basic_auth, hookimpl, outcome_for_status

_encode = msgspec.json.Encoder().encode


class BasicAuth(msgspec.Struct, forbid_unknown_fields=True):
    username: str
    password: str = ""


class WebhookDestination(Destination):
    type = "webhook"
    limits = Limits(max_batch_calls=100, max_batch_bytes=500_000, max_call_bytes=32_000,
                    batch_overhead=len(b'{"batch":[]}'), rate_requests=1e9)

    class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        url: str | None = None
        #: the same as url; every destination takes endpoint
        endpoint: str | None = None
        method: str = "POST"
        headers: dict[str, str] = msgspec.field(default_factory=dict)
        basic_auth: BasicAuth | None = None
        bearer_token: str | None = None
        max_batch_calls: int | None = None
        max_batch_bytes: int | None = None
        max_call_bytes: int | None = None

        def __post_init__(self) -> None:
            if not (self.url or self.endpoint):
                raise ValueError("url is required")

    def __init__(self, name: str, settings: Settings, http: HttpClient) -> None:
        super().__init__(name, settings, http)
        self.url = settings.endpoint or settings.url
        self.headers = {"Content-Type": "application/json", **settings.headers}
        if settings.bearer_token:
            self.headers["Authorization"] = f"Bearer {settings.bearer_token}"
        if settings.basic_auth:
            self.headers["Authorization"] = basic_auth(settings.basic_auth.username, settings.basic_auth.password)
        self.limits = msgspec.structs.replace(
            type(self).limits,
            max_batch_calls=settings.max_batch_calls or type(self).limits.max_batch_calls,
            max_batch_bytes=settings.max_batch_bytes or type(self).limits.max_batch_bytes,
            max_call_bytes=settings.max_call_bytes or type(self).limits.max_call_bytes)

    forwards_calls = True

    def prepare(self, call: dict[str, Any]) -> bytes:
        return _encode(call)

    def batch_body(self, payloads: list[bytes]) -> bytes:
        return b'{"batch":[' + b",".join(payloads) + b"]}"

    async def send(self, payloads: list[bytes]) -> list[Outcome]:
        async with self.http.request(self.settings.method, self.url, data=self.batch_body(payloads),
                                     headers=self.headers) as resp:
            text = await resp.text(errors="replace")
            return [outcome_for_status(resp.status, text, resp.headers)] * len(payloads)


@hookimpl
def register_destinations() -> list[type[Destination]]:
    return [WebhookDestination]
