"""The three Python SDKs, unmodified, pointed at a live gateway with their
``host`` option: Customer.io's (customerio-cdp-analytics, ``customerio.analytics``),
Segment's (segment-analytics-python, ``segment.analytics``) and RudderStack's
(rudder-sdk-python, ``rudderstack.analytics``).

docs/pipelines-api.md, "Overview": "In general, you'll consume
this API through one of our source libraries ... our server packages"; the
libraries send ``/v1/batch`` with Basic auth (the key as username, blank
password, "Authentication & rate limits"), Customer.io's sends region keys
(``pk_us_...``) as Bearer, Segment's adds ``writeKey`` to the body and
RudderStack's gzips and puts identify traits in ``context.traits``.

Each SDK is configured through its module globals as its README shows
(``write_key``, ``host``/``dataPlaneUrl``, ``on_error``, ...), restored
afterwards; its blocking ``flush()``/``shutdown()`` runs in a thread so the
event loop that serves the gateway and the sink keeps running.
"""

from __future__ import annotations

import asyncio
import importlib
import re
from pathlib import Path
from typing import Any

import pytest

from gateway.testing import WRITE_KEY, FakeDestination, spool_calls

REGION_KEY = "pk_us_0123456789abcdef"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

SDKS = {
    # name: (module, version module, attribute that takes the gateway URL)
    "customerio": ("customerio.analytics", "customerio.analytics.version", "host"),
    "segment": ("segment.analytics", "segment.analytics.version", "host"),
    "rudderstack": ("rudderstack.analytics", "rudderstack.analytics.version", "dataPlaneUrl"),
}
#: what the destination got is compared with what the spool holds after the delivery: keep it
KEEP = {"retention": 3600}


def send_all(mod: Any, errors: list[Any]) -> dict[str, str | None]:
    """identify, track, page, screen, group and alias through the module API;
    → call type → the messageId the SDK gave it (None where it does not say)."""
    ids: dict[str, str | None] = {}

    def took(kind: str, result: Any) -> None:
        ids[kind] = result[1]["messageId"] if isinstance(result, tuple) else None

    took("identify", mod.identify("u-1", {"email": "ada@example.com", "plan": "pro"}, message_id="sdk-identify-1"))
    took("track", mod.track("u-1", "Order Completed", {"revenue": 42.5, "currency": "EUR"}))
    took("page", mod.page("u-1", "Docs", "Home", {"path": "/"}, message_id="sdk-page-1"))
    took("screen", mod.screen("u-1", "App", "Settings", {"tab": "privacy"}))
    took("group", mod.group("u-1", "g-1", {"name": "Acme"}))
    took("alias", mod.alias("anon-1", "u-1"))
    mod.flush()
    mod.shutdown()
    return ids


@pytest.mark.parametrize("sdk,key", [
    ("customerio", WRITE_KEY), ("customerio", REGION_KEY), ("segment", WRITE_KEY), ("rudderstack", WRITE_KEY),
], ids=["customerio-basic", "customerio-bearer", "segment", "rudderstack"])
async def test_sdk_calls_reach_the_destination(gateway_client: Any, fake_destination: FakeDestination, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, no_proxy: None, sdk: str,
                                               key: str) -> None:
    module_name, version_module, host_attr = SDKS[sdk]
    mod = importlib.import_module(module_name)
    version = importlib.import_module(version_module).VERSION
    client = await gateway_client(
        storage=KEEP, sources=[{"name": "server", "write_keys": [key]}],
        destinations=[{"name": "Hook", "type": "webhook", "settings": {"url": fake_destination.url},
                       "batch": {"max_wait": 0.01}}])
    url = str(client.make_url("")).rstrip("/")
    errors: list[Any] = []
    monkeypatch.setattr(mod, "default_client", None)
    monkeypatch.setattr(mod, "write_key", key)
    monkeypatch.setattr(mod, host_attr, url)
    monkeypatch.setattr(mod, "on_error", lambda e, batch: errors.append(e))
    monkeypatch.setattr(mod, "max_retries", 1)
    monkeypatch.setattr(mod, "sync_mode", False)
    monkeypatch.setattr(mod, "send", True)
    try:
        ids = await asyncio.wait_for(asyncio.to_thread(send_all, mod, errors), 30)
    finally:
        if mod.default_client is not None and mod.default_client.consumers:
            for c in mod.default_client.consumers:
                c.pause()
    assert errors == [], errors

    calls = await fake_destination.wait_delivered(6, timeout=15)
    assert len(calls) == 6, [c["type"] for c in calls]
    by_type = {c["type"]: c for c in calls}
    assert sorted(by_type) == ["alias", "group", "identify", "page", "screen", "track"]

    for kind, c in by_type.items():
        assert c["context"]["library"] == {"name": "analytics-python", "version": version}, kind
        assert c["context"]["ip"] == "127.0.0.1"
        assert "writeKey" not in c
        assert c["receivedAt"].endswith("Z") and c["originalTimestamp"] and c["sentAt"], kind
        if ids.get(kind):
            assert c["messageId"] == ids[kind], "the SDK's messageId is kept"
        assert c["messageId"] in ("sdk-identify-1", "sdk-page-1") or UUID.match(c["messageId"]), c["messageId"]
    assert by_type["identify"]["messageId"] == "sdk-identify-1"
    assert by_type["page"]["messageId"] == "sdk-page-1"
    assert len({c["messageId"] for c in calls}) == 6

    ident = by_type["identify"]
    assert ident["userId"] == "u-1"
    assert ident["traits"] == {"email": "ada@example.com", "plan": "pro"}, "RudderStack's context.traits lifted"
    track = by_type["track"]
    assert (track["userId"], track["event"], track["properties"]) == (
        "u-1", "Order Completed", {"revenue": 42.5, "currency": "EUR"})
    page = by_type["page"]
    assert (page["userId"], page["name"], page["category"], page["properties"]) == (
        "u-1", "Home", "Docs", {"path": "/"})
    screen = by_type["screen"]
    assert (screen["name"], screen["category"], screen["properties"]) == ("Settings", "App", {"tab": "privacy"})
    group = by_type["group"]
    assert (group["userId"], group["groupId"], group["traits"]) == ("u-1", "g-1", {"name": "Acme"})
    alias = by_type["alias"]
    assert (alias["previousId"], alias["userId"]) == ("anon-1", "u-1")
    if sdk == "rudderstack":
        assert all(c["channel"] == "server" and c["integrations"] == {"All": True} for c in calls)

    # What the gateway stored is what the destination got (the Pipelines call, as sent plus enrichment).
    assert sorted(c["messageId"] for c in spool_calls(tmp_path)) == sorted(c["messageId"] for c in calls)
    assert {r.path for r in fake_destination.requests} == {"/hook"}


async def test_segment_sdk_in_sync_mode_and_gzip(gateway_client: Any, fake_destination: FakeDestination,
                                                 no_proxy: None) -> None:
    """Segment's Client in ``sync_mode`` with ``gzip=True``: one blocking POST
    per call, gzip-encoded (docs/pipelines-api.md: content encodings)."""
    from segment.analytics import Client

    client = await gateway_client(destinations=[{"name": "Hook", "type": "webhook",
                                                 "settings": {"url": fake_destination.url},
                                                 "batch": {"max_wait": 0.01}}])
    url = str(client.make_url("")).rstrip("/")

    def run() -> list[str]:
        c = Client(WRITE_KEY, host=url, sync_mode=True, gzip=True, max_retries=0)
        out = [c.track("u-2", "Signed Up", {"n": i})[1]["messageId"] for i in range(3)]
        out.append(c.identify(anonymous_id="anon-2", traits={"k": "v"})[1]["messageId"])
        return out

    ids = await asyncio.wait_for(asyncio.to_thread(run), 30)
    calls = await fake_destination.wait_delivered(4)
    assert [c["messageId"] for c in calls] == ids
    assert [c["type"] for c in calls] == ["track", "track", "track", "identify"]
    assert calls[3]["anonymousId"] == "anon-2" and calls[3]["traits"] == {"k": "v"}


async def test_sdk_with_a_wrong_key_reports_nothing_stored(gateway_client: Any, fake_destination: FakeDestination,
                                                           tmp_path: Path, no_proxy: None) -> None:
    """A wrong key on a lax source: 200 (docs/pipelines-api.md, lax
    mode), so the SDK sees no error, and nothing is stored or delivered."""
    from customerio.analytics import Client

    client = await gateway_client(storage=KEEP, destinations=[{"name": "Hook", "type": "webhook",
                                                               "settings": {"url": fake_destination.url}}])
    url = str(client.make_url("")).rstrip("/")
    errors: list[Any] = []

    def run() -> None:
        c = Client("not-a-key", host=url, sync_mode=True, max_retries=0, on_error=lambda e, b: errors.append(e))
        c.track("u-3", "Nope")

    await asyncio.wait_for(asyncio.to_thread(run), 30)
    assert errors == []
    await fake_destination.wait_quiet()  # what was stored would be delivered within it
    assert spool_calls(tmp_path) == [] and fake_destination.delivered() == []
