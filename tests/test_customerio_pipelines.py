"""The ``customerio_pipelines`` destination against a strict fake of Customer.io's
Pipelines API (tests/fake_customerio.py), and both Customer.io destinations
end to end behind the real gateway app.  What Customer.io's APIs do is cited
from docs/customerio-apis.md by section (§n) and rule id."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from fake_customerio import PIPELINES_API_KEY, SITE_ID, TRACK_API_KEY, FakeCustomerIO
from gateway.api import DELIVERED, Failed, Limits, MappingError, Paused, Retry
from gateway.config import ConfigError, StorageConfig, to_struct
from gateway.http_client import HttpClient, HttpPool, Throttle
from gateway.testing import WRITE_KEY
from gateway.plugins import build_registry, make_manager
from gateway.spool import open_dead_letters
from plugins.customerio.pipelines import CustomerioPipelinesDestination as Pipelines
from plugins.customerio.track_v2 import CustomerioTrackDestination as Track

ISO_MS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")

#: stored calls as ingest leaves them (enriched), with keys Customer.io's SDKs send
CALLS: list[dict[str, Any]] = [
    {"type": "identify", "userId": "97980cfea0067", "messageId": "m-1", "timestamp": "2024-03-20T15:30:00.123Z",
     "receivedAt": "2024-03-20T15:30:01.000Z", "traits": {"email": "cool.person@example.com", "likes_pizza": True},
     "context": {"ip": "8.8.8.8", "library": {"name": "analytics.js", "version": "2.11.1"}},
     "integrations": {"All": True, "Mixpanel": False}, "channel": "browser", "version": 1.1},
    {"type": "track", "anonymousId": "23adfd82-aa0f-45a7-a756-24f2a7a4c895", "event": "Course Started",
     "messageId": "ajs-f8ca1e4de5024d9430b3928bd8ac6b96", "properties": {"title": "Intro to Customer.io"},
     "timestamp": "2015-12-12T19:11:01.249Z", "originalTimestamp": "2015-12-12T19:11:01.152Z",
     "sentAt": "2015-12-12T19:11:01.169Z", "receivedAt": "2015-12-12T19:11:01.266Z", "context": {},
     "integrations": {}},
    {"type": "group", "userId": "u", "groupId": "acme", "messageId": "m-3", "traits": {"objectTypeId": 2},
     "timestamp": "2024-03-20T15:30:00.000Z", "context": {}},
    {"type": "alias", "userId": "u", "previousId": "anon", "messageId": "m-4", "timestamp": "2024-03-20T15:30:00.000Z"},
    {"type": "page", "anonymousId": "a", "name": "Home", "properties": {"url": "https://example.com"},
     "messageId": "m-5", "timestamp": "2024-03-20T15:30:00.000Z"},
    {"type": "screen", "userId": "u", "name": "feed", "messageId": "m-6", "timestamp": "2024-03-20T15:30:00.000Z"},
    {"type": "track", "userId": "u", "event": "User Deleted", "messageId": "m-7", "timestamp": "2024-03-20T15:30:00Z"},
]


def make(http: HttpClient | None = None, **settings: Any) -> Pipelines:
    """A destination as the engine builds it: settings converted from the raw mapping.
    Without ``http`` (tests that only prepare), its client's pool never connects."""
    return Pipelines("Customer.io Data Pipelines",
                     to_struct({"api_key": PIPELINES_API_KEY, **settings}, Pipelines.Settings),
                     http or HttpClient(HttpPool(), Throttle(1e9, 1.0)))


def raw(call: dict[str, Any]) -> bytes:
    """A payload that did not go through ``prepare`` (to make the fake refuse it)."""
    return json.dumps(call, separators=(",", ":")).encode()


# -- prepare -------------------------------------------------------------------------------


@pytest.mark.parametrize("call", CALLS, ids=lambda c: f"{c['type']}-{c['messageId']}")
def test_prepare_forwards_the_call_unchanged(call: dict[str, Any]) -> None:
    """docs/customerio-apis.md §1: calls go unchanged, context, integrations, messageId,
    timestamps and keys the gateway does not know (channel, version) included."""
    assert json.loads(make().prepare(json.loads(json.dumps(call)))) == call


def test_prepare_drops_keys_that_never_leave_the_gateway() -> None:
    """gateway/events.py STRIPPED_KEYS: a source's write key is never sent on."""
    call = {**CALLS[0], "writeKey": "secret", "_metadata": {"bundled": []}}
    assert json.loads(make().prepare(call)) == CALLS[0]


@pytest.mark.parametrize("call, code", [
    ({"type": "track", "userId": "u"}, "MISSING_FIELD"),
    ({"type": "group", "userId": "u"}, "MISSING_FIELD"),
    ({"type": "alias", "userId": "u"}, "MISSING_FIELD"),
    ({"type": "identify", "traits": {"email": "e@example.com"}}, "MISSING_FIELD"),
    ({"type": "delete", "userId": "u"}, "BAD_TYPE"),
])
def test_prepare_refuses_what_strict_mode_refuses(call: dict[str, Any], code: str) -> None:
    """docs/customerio-apis.md §6.2 SM-4: a call that lost a field strict mode requires (a
    destination transform may remove one) is dead-lettered at once instead of costing a
    400 and a bisection."""
    with pytest.raises(MappingError) as e:
        make().prepare(call)
    assert e.value.code == code


# -- settings ----------------------------------------------------------------------------------


def test_urls_and_auth() -> None:
    """docs/customerio-apis.md §2 (US/EU hosts, H-1, H-3: ``endpoint`` overrides) and §3 AU-2
    (the API key is the Basic username, the password is blank)."""
    assert make().batch_url == "https://cdp.customer.io/v1/batch"
    assert make(region=" EU ").batch_url == "https://cdp-eu.customer.io/v1/batch"
    assert make(endpoint="http://127.0.0.1:9/").batch_url == "http://127.0.0.1:9/v1/batch"
    assert make().headers == {
        "Content-Type": "application/json", "X-Strict-Mode": "1",
        "Authorization": "Basic " + base64.b64encode(f"{PIPELINES_API_KEY}:".encode()).decode()}


@pytest.mark.parametrize("settings, field", [
    ({}, "api_key"), ({"api_key": ""}, "api_key"), ({"api_key": "k", "site_id": "s"}, "site_id"),
    ({"api_key": "k", "region": "apac"}, "region"),
])
def test_settings_errors_name_the_field(settings: dict[str, Any], field: str) -> None:
    """docs/plugins.md: the settings Struct forbids unknown fields, so config errors name the field."""
    with pytest.raises(ConfigError) as e:
        to_struct(settings, Pipelines.Settings)
    assert field in str(e.value)


def test_limits() -> None:
    """500KB a batch, 32KB a call, 3000 requests per 3 seconds (docs/customerio-apis.md §5
    and §8); the body is ``{"batch":[...]}`` (docs/customerio-apis.md §4 BD-2)."""
    assert Pipelines.limits == Limits(max_batch_calls=100, max_batch_bytes=500_000, max_call_bytes=32_000,
                                      batch_overhead=len(b'{"batch":[]}'), rate_requests=3000.0, rate_period=3.0)
    d = make()
    payloads = [d.prepare(c) for c in CALLS[:3]]
    body = d.batch_body(payloads)
    assert json.loads(body) == {"batch": CALLS[:3]}
    assert len(body) == d.limits.batch_overhead + sum(map(len, payloads)) + 2


def test_registered_as_a_builtin_plugin() -> None:
    assert build_registry(make_manager()).destinations["customerio_pipelines"] is Pipelines


# -- send, against the fake -----------------------------------------------------------------------


async def test_send_posts_the_documented_batch(cio: FakeCustomerIO, http: HttpClient) -> None:
    """docs/customerio-apis.md §2-§4: POST /v1/batch with ``batch``; Basic ``API_KEY:``;
    ``X-Strict-Mode: 1`` (docs/customerio-apis.md §6 SM-1) so errors are not a silent 200."""
    d = make(http, endpoint=cio.url)
    assert await d.send([d.prepare(c) for c in CALLS]) == [DELIVERED] * len(CALLS)
    [req] = cio.requests
    assert (req.method, req.path, req.status) == ("POST", "/v1/batch", 200)
    assert req.headers["Authorization"] == "Basic " + base64.b64encode(f"{PIPELINES_API_KEY}:".encode()).decode()
    assert req.headers["X-Strict-Mode"] == "1" and req.headers["Content-Type"] == "application/json"
    assert req.json == {"batch": CALLS}
    assert cio.pipelines_calls == CALLS


async def test_lax_mode_would_hide_errors(cio: FakeCustomerIO, http: HttpClient) -> None:
    """docs/customerio-apis.md §6.1: without X-Strict-Mode a bad call gets a 200 and
    vanishes; with it (as the destination sends) it is reported."""
    bad = {"batch": [{"type": "track", "userId": "u"}]}
    auth = make().headers["Authorization"]
    async with http.post(cio.url + "/v1/batch", json=bad, headers={"Authorization": auth}) as r:
        assert r.status == 200
    d = make(http, endpoint=cio.url)
    [out] = await d.send([raw(bad["batch"][0])])
    assert isinstance(out, Failed) and out.status == 400 and "event" in out.body
    assert cio.pipelines_calls == []


async def test_bad_key_pauses(cio: FakeCustomerIO, http: HttpClient) -> None:
    """Strict mode answers authentication errors with a 401 or a 400
    (docs/customerio-apis.md §6.1, SM-3): both pause the destination (§7.3), so the
    backlog waits for a new key instead of being dead-lettered."""
    with pytest.raises(Paused) as e:
        await make(http, endpoint=cio.url, api_key="wrong").send([make().prepare(CALLS[0])])
    assert e.value.status == 401
    cio.fail("pipelines", 400, body={"error": "Invalid API key"})
    with pytest.raises(Paused) as e:
        await make(http, endpoint=cio.url).send([make().prepare(c) for c in CALLS[:2]])
    assert e.value.status == 400
    assert len(cio.requests) == 2 and cio.pipelines_calls == []


async def test_400_is_bisected_to_the_bad_calls(cio: FakeCustomerIO, http: HttpClient) -> None:
    """Strict mode refuses a batch with a call missing a required field and accepts
    nothing of it (docs/customerio-apis.md §6 SM-2); the destination splits the batch to
    find that call, fails it, and delivers the others in order."""
    d = make(http, endpoint=cio.url)
    payloads = [d.prepare(c) for c in CALLS]
    payloads[2] = raw({"type": "group", "userId": "u", "messageId": "no-group-id"})
    payloads[5] = raw({"type": "screen", "name": "no person", "messageId": "no-user"})
    out = await d.send(payloads)
    assert [type(o).__name__ for o in out] == ["Delivered", "Delivered", "Failed", "Delivered", "Delivered",
                                               "Failed", "Delivered"]
    assert "groupId" in out[2].body and "userId" in out[5].body  # type: ignore[union-attr]
    assert cio.pipelines_calls == [c for i, c in enumerate(CALLS) if i not in (2, 5)]
    assert len(cio.requests) <= 2 * len(CALLS) - 1


async def test_oversize_call_fails_alone(cio: FakeCustomerIO, http: HttpClient) -> None:
    """docs/customerio-apis.md §5: 32KB per call; strict mode says so with a 400 (§6.1).
    The engine dead-letters such calls before sending (limits.max_call_bytes, SZ-3);
    this is what happens if one slips through."""
    d = make(http, endpoint=cio.url)
    big = raw({"type": "track", "userId": "u", "event": "Big", "properties": {"v": "x" * 33_000}})
    out = await d.send([d.prepare(CALLS[0]), big])
    assert out[0] == DELIVERED and isinstance(out[1], Failed) and out[1].status == 400
    assert cio.pipelines_calls == CALLS[:1]


async def test_oversize_batch_is_split(cio: FakeCustomerIO, http: HttpClient) -> None:
    """500KB a batch (docs/customerio-apis.md §5): a 400 for the batch's size is resolved by
    splitting it."""
    d = make(http, endpoint=cio.url)
    payloads = [d.prepare(c) for c in CALLS]
    cio.max_body["pipelines"] = len(d.batch_body(payloads)) // 2
    assert await d.send(payloads) == [DELIVERED] * len(CALLS)
    assert cio.pipelines_calls == CALLS


@pytest.mark.parametrize("status, headers, retry_after", [(429, {"Retry-After": "3"}, 3.0), (500, {}, None),
                                                          (503, {"Retry-After": "1.5"}, 1.5), (408, {}, None)])
async def test_throttling_and_server_errors_retry(cio: FakeCustomerIO, http: HttpClient, status: int,
                                                 headers: dict[str, str], retry_after: float | None) -> None:
    """docs/customerio-apis.md §7.1: 429 is retried after Retry-After; 5xx and 408 are retried by the engine."""
    d = make(http, endpoint=cio.url)
    payloads = [d.prepare(c) for c in CALLS[:2]]
    cio.fail("pipelines", status, headers=headers)
    out = await d.send(payloads)
    assert all(isinstance(o, Retry) and o.status == status and o.retry_after == retry_after for o in out)
    assert await d.send(payloads) == [DELIVERED, DELIVERED]
    assert cio.pipelines_calls == CALLS[:2]


async def test_item_errors_in_a_success_answer(cio: FakeCustomerIO, http: HttpClient) -> None:
    """An answer that names failed items (batch_index) fails only those, as for Track
    (docs/customerio-apis.md §7.2); the shared reader handles both APIs."""
    d = make(http, endpoint=cio.url)
    cio.item_errors("pipelines", [{"batch_index": 0, "message": "dropped"}], status=200)
    out = await d.send([d.prepare(c) for c in CALLS[:2]])
    assert isinstance(out[0], Failed) and "dropped" in out[0].reason and out[1] == DELIVERED
    assert cio.pipelines_calls == CALLS[1:2]


# -- end to end: both Customer.io destinations behind the real gateway ----------------------------


def both_destinations(cio: FakeCustomerIO) -> str:
    return f"""
        destinations:
          - name: Customer.io
            type: customerio_track
            settings: {{site_id: {SITE_ID}, api_key: {TRACK_API_KEY}, region: US, endpoint: "{cio.url}"}}
          - name: CIO Pipelines
            type: customerio_pipelines
            settings: {{api_key: {PIPELINES_API_KEY}, region: eu, endpoint: "{cio.url}"}}
        """


async def test_e2e_both_destinations(gateway_client: Callable[..., Any], cio: FakeCustomerIO) -> None:
    """One batch posted to the gateway reaches Customer.io twice, independently
    (docs/customerio-apis.md §1): Pipelines gets each call as sent plus the gateway's enrichment
    (messageId kept, receivedAt, context.ip, originalTimestamp), Track gets the mapped op
    (docs/customerio-track-v2.md §4).  The integrations object routes per destination."""
    client = await gateway_client(both_destinations(cio))
    sent: list[dict[str, Any]] = [
        {"type": "identify", "userId": "user-42", "messageId": "m-1", "timestamp": "2024-03-20T15:34:00Z",
         "traits": {"name": "Sam", "since": "2024-01-02T03:04:05Z"}, "context": {"locale": "en-US"},
         "channel": "server"},
        {"type": "track", "userId": "user-42", "event": "Order Completed", "messageId": "01HS6Q3Z8X4M2N7P9R5T1V3W6Y",
         "timestamp": "2024-03-20T15:36:10.999Z", "properties": {"total": 42.5},
         "integrations": {"Mixpanel": False}},
        {"type": "track", "userId": "user-42", "event": "Pipelines only", "messageId": "m-3",
         "timestamp": "2024-03-20T15:36:11Z", "integrations": {"All": False, "CIO Pipelines": True}},
    ]
    r = await client.post("/v1/batch", json={"batch": sent}, headers={"Authorization": f"Bearer {WRITE_KEY}"})
    assert r.status == 200 and await r.json() == {}
    await cio.wait_for(lambda: len(cio.pipelines_calls) >= 3 and len(cio.track_ops) >= 2)
    for got, call in zip(cio.pipelines_calls, sent):
        assert ISO_MS.fullmatch(got["receivedAt"])
        assert got == {**call, "receivedAt": got["receivedAt"], "originalTimestamp": call["timestamp"],
                       "context": {**call.get("context", {}), "ip": "127.0.0.1"}}
    assert cio.track_ops == [
        {"type": "person", "action": "identify", "identifiers": {"id": "user-42"}, "timestamp": 1710948840,
         "attributes": {"name": "Sam", "since": 1704164645}},
        {"type": "person", "action": "event", "identifiers": {"id": "user-42"}, "name": "Order Completed",
         "id": "01HS6Q3Z8X4M2N7P9R5T1V3W6Y", "timestamp": 1710948970, "attributes": {"total": 42.5}},
    ]
    assert all(r.status == 200 for r in cio.requests)


async def test_e2e_one_destination_down_does_not_hold_the_other(gateway_client: Callable[..., Any],
                                                               cio: FakeCustomerIO, tmp_path: Path) -> None:
    """A destination that is down never holds back the other (docs/customerio-apis.md §1):
    with a bad Track key (401 → paused, docs/customerio-apis.md §7.3; nothing
    dead-lettered) Pipelines still delivers."""
    client = await gateway_client(both_destinations(cio).replace(f"api_key: {TRACK_API_KEY}", "api_key: revoked"))
    call = {"type": "track", "userId": "u", "event": "E", "messageId": "m-1"}
    r = await client.post("/v1/track", json=call, headers={"Authorization": f"Bearer {WRITE_KEY}"})
    assert r.status == 200
    await cio.wait_for(lambda: len(cio.pipelines_calls) == 1 and any(r.status == 401 for r in cio.track_requests))
    assert cio.pipelines_calls[0]["messageId"] == "m-1" and cio.track_ops == []
    await asyncio.sleep(0.2)
    store = open_dead_letters(StorageConfig(path=str(tmp_path / "spool")))
    try:
        assert store.list() == []
    finally:
        store.close()
    metrics = await (await client.get("/metrics")).text()
    assert re.search(r'gateway_destination_paused\{destination="Customer.io"\} 1', metrics), metrics[-2000:]


def test_docs_example_config_builds() -> None:
    """README.md's Customer.io example config loads and builds both destinations as documented."""
    from gateway import config as config_mod
    from gateway.plugins import build

    text = (Path(__file__).parent.parent / "README.md").read_text("utf-8")
    section = text[text.index("\n## Customer.io\n"):]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    env = {"CIO_SITE_ID": "site", "CIO_TRACK_API_KEY": "track-key", "CIO_PIPELINES_API_KEY": "cdp-key"}
    cfg = config_mod.loads(example, env=env)
    [track_built, pipelines_built] = build(cfg).destinations
    track, pipelines = track_built.destination, pipelines_built.destination
    assert isinstance(track, Track) and isinstance(pipelines, Pipelines)
    assert track.batch_url == "https://track.customer.io/api/v2/batch"
    assert track.headers["Authorization"] == "Basic " + base64.b64encode(b"site:track-key").decode()
    assert pipelines.batch_url == "https://cdp-eu.customer.io/v1/batch"
    assert pipelines.headers["Authorization"] == "Basic " + base64.b64encode(b"cdp-key:").decode()


async def test_e2e_customerio_python_sdk(gateway_client: Callable[..., Any], cio: FakeCustomerIO) -> None:
    """Customer.io's own Python SDK (customerio-cdp-analytics, pointed at the gateway with
    ``host``) → gateway → both destinations: Pipelines gets the SDK's message plus the
    gateway's enrichment (ingest corrects ``timestamp`` by the SDK's ``sentAt`` and keeps
    the original as ``originalTimestamp``); Track gets the mapped ops."""
    from datetime import datetime, timezone

    from customerio.analytics import Client

    client = await gateway_client(both_destinations(cio))
    sdk = Client(write_key=WRITE_KEY, host=str(client.make_url("")), sync_mode=True, max_retries=0)
    when = datetime(2024, 3, 20, 15, 36, 10, tzinfo=timezone.utc)

    def send() -> list[dict[str, Any]]:
        return [sdk.identify("jane@example.com", {"plan": "pro"}, timestamp=when, message_id="sdk-1")[1],
                sdk.track("jane@example.com", "Signed Up", {"trial": True}, timestamp=when,
                          message_id="01HS6Q3Z8X4M2N7P9R5T1V3W6Y")[1]]

    messages = json.loads(json.dumps(await asyncio.get_running_loop().run_in_executor(None, send)))
    await cio.wait_for(lambda: len(cio.pipelines_calls) >= 2 and len(cio.track_ops) >= 2)
    for got, msg in zip(cio.pipelines_calls, messages):
        assert ISO_MS.fullmatch(got["receivedAt"]) and ISO_MS.fullmatch(got["timestamp"])
        assert got == {**msg, "receivedAt": got["receivedAt"], "sentAt": got["sentAt"], "timestamp": got["timestamp"],
                       "originalTimestamp": msg["timestamp"], "context": {**msg["context"], "ip": "127.0.0.1"}}
        assert 0 <= (datetime.fromisoformat(got["timestamp"]) - when).total_seconds() < 1
    assert cio.track_ops == [
        {"type": "person", "action": "identify", "identifiers": {"email": "jane@example.com"},
         "timestamp": 1710948970, "attributes": {"plan": "pro"}},
        {"type": "person", "action": "event", "identifiers": {"email": "jane@example.com"}, "name": "Signed Up",
         "id": "01HS6Q3Z8X4M2N7P9R5T1V3W6Y", "timestamp": 1710948970, "attributes": {"trial": True}},
    ]
