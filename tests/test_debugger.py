"""The debugger's HTTP side (issue 15) against the real app on a real socket:
``server.admin`` and its Basic auth on every ``/debugger`` path; the
``/debugger/events`` stream's record for each outcome (accepted, rejected in
lax and strict mode, dropped, delivered, retried, dead-lettered, skipped,
replayed), its filters, its heartbeat, its bounds with a slow reader; the
status and dead-letter endpoints and the replay POST; and that write keys and
admin credentials never leave in any of them.

The page itself, in Chromium, is tests/test_debugger_browser.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import aiohttp
import pytest
from aiohttp import web

# -- what this file takes from the test kit (gateway/testing.py) and conftest.py --
# fixtures: gateway_client, gateway_process, fake_destination, make_fake_destination
# (the kit); test_plugins (conftest.py: tests/plugins on sys.path).
from gateway.testing import (
    AUTH_HEADERS, WRITE_KEY, FakeDestination, ReceivedRequest, send, send_batch, status, track, wait_until, webhook,
)
from gateway import app_state as state
from gateway.activity import ActivityFeed
from gateway.config import ConfigError, loads
from gateway.debugger import stream as debugger_stream
from gateway.delivery import sender as delivery_sender

ADMIN_USER = "ops-7f3a"
ADMIN_PASSWORD = "pw-Zq81-never-shown"
ADMIN = {"user": ADMIN_USER, "password": ADMIN_PASSWORD}
#: a destination credential: the status page must not show settings either
DEST_SECRET = "dest-token-9c2e41"
#: a track_api source's API key: a write key by another name
TRACK_API_KEY = "track-api-key-5d07"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


CREDS = basic(ADMIN_USER, ADMIN_PASSWORD)


def admin(destinations: Sequence[dict[str, Any]] = (), **config: Any) -> dict[str, Any]:
    """The kit's config blocks (``gateway_client(**admin(...))``) with server.admin set."""
    return {**config, "server": {"admin": ADMIN, **config.get("server", {})}, "destinations": list(destinations)}


def itemized(name: str, url: str) -> dict[str, Any]:
    """tests/plugins/itemized_destination.py: one outcome per call."""
    return {**webhook(name, url), "type": "itemized", "settings": {"endpoint": url}}


async def itemized_answers(request: web.Request, req: ReceivedRequest) -> web.StreamResponse:
    """That plugin's fake API: 207, one result per item, by its ``behave``."""
    codes = {"ok": (200, ""), "fail": (422, "email is not an email"), "flaky": (503, "try again")}
    results = [{"status": codes[i["behave"]][0], "error": codes[i["behave"]][1]} for i in req.json["items"]]
    return web.json_response({"results": results}, status=207)


class Stream:
    """A reader of ``/debugger/events``: every record in order, the raw bytes
    and the comment lines (heartbeats)."""

    def __init__(self, resp: Any) -> None:
        self.resp = resp
        self.records: list[dict[str, Any]] = []
        self.comments: list[bytes] = []
        self.raw = bytearray()
        self.arrived = asyncio.Event()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        pending = b""
        data: list[bytes] = []
        while chunk := await self.resp.content.readany():
            self.raw += chunk
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not line:
                    if data:
                        self.records.append(json.loads(b"\n".join(data)))
                        data = []
                elif line.startswith(b":"):
                    self.comments.append(line)
                elif line.startswith(b"data: "):
                    data.append(line[6:])
            self.arrived.set()

    def of(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind and all(r.get(k) == v for k, v in fields.items())]

    async def wait(self, kind: str, n: int = 1, timeout: float = 10.0, **fields: Any) -> list[dict[str, Any]]:
        """The first ``n`` records of ``kind`` with ``fields``, once they came."""
        await wait_until(lambda: len(self.of(kind, **fields)) >= n, what=f"{n} {kind} record(s) {fields}",
                         timeout=timeout, event=self.arrived, seen=lambda: json.dumps(self.records, indent=1)[-4000:])
        return self.of(kind, **fields)[:n]

    async def close(self) -> None:
        self.task.cancel()
        self.resp.close()


@pytest.fixture
async def streams() -> AsyncIterator[Callable[..., Any]]:
    """``await open_stream(client, query)``: a Stream, closed at teardown."""
    opened: list[Stream] = []

    async def open_stream(client: Any, query: str = "", headers: dict[str, str] = CREDS) -> Stream:
        resp = await client.get(f"/debugger/events{query}", headers=headers)
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        s = Stream(resp)
        opened.append(s)
        await s.wait("hello")
        return s
    yield open_stream
    for s in opened:
        await s.close()


def feed_of(client: Any) -> ActivityFeed:
    return client.server.app[state.ACTIVITY]


# -- configuration and auth --------------------------------------------------------------

PATHS = ["/debugger", "/debugger/", "/debugger/page.js", "/debugger/page.css", "/debugger/events",
         "/debugger/status", "/debugger/dead-letters", "/debugger/replay", "/debugger/no-such-thing"]


def test_admin_config() -> None:
    cfg = loads("server:\n  admin: {user: ops, password: \"${PW}\"}\n", env={"PW": "x-1234"})
    assert cfg.server.admin is not None and (cfg.server.admin.user, cfg.server.admin.password) == ("ops", "x-1234")
    assert loads("{}").server.admin is None
    with pytest.raises(ConfigError, match="server.admin"):
        loads("server:\n  admin: {user: ops, password: ''}\n")
    with pytest.raises(ConfigError, match="password"):
        loads("server:\n  admin: {user: ops}\n")


async def test_without_admin_every_debugger_path_is_404(gateway_client: Any) -> None:
    client = await gateway_client()
    for path in PATHS:
        for method in ("GET", "POST"):
            for headers in ({}, CREDS):
                r = await client.request(method, path, headers=headers)
                assert r.status == 404, (method, path, headers, r.status)
                assert "WWW-Authenticate" not in r.headers
    assert not feed_of(client).watched


async def test_every_debugger_path_wants_the_admin(gateway_client: Any) -> None:
    client = await gateway_client(**admin())
    wrong = [{}, basic(ADMIN_USER, "wrong"), basic("admin", ADMIN_PASSWORD), basic(ADMIN_USER, ADMIN_PASSWORD + "x"),
             basic(ADMIN_USER, ""), {"Authorization": f"Bearer {ADMIN_PASSWORD}"}, basic(WRITE_KEY, ""),
             {"Authorization": "Basic not-base64!"}, {"Authorization": "Basic " + base64.b64encode(
                 ADMIN_PASSWORD.encode()).decode()}]
    for path in PATHS:
        for method in ("GET", "POST"):
            for headers in wrong:
                r = await client.request(method, path, headers=headers)
                assert r.status == 401, (method, path, headers, r.status)
                assert r.headers["WWW-Authenticate"].startswith('Basic realm="gateway debugger"')
                assert ADMIN_PASSWORD not in await r.text()
    assert not feed_of(client).watched, "a refused request never watches"
    # the right credentials
    for path, want in [("/debugger", "text/html"), ("/debugger/page.js", "text/javascript"),
                       ("/debugger/page.css", "text/css"), ("/debugger/status", "application/json"),
                       ("/debugger/dead-letters", "application/json")]:
        r = await client.get(path, headers=CREDS)
        assert r.status == 200, path
        assert r.headers["Content-Type"].startswith(want), (path, r.headers["Content-Type"])
        assert r.headers["Cache-Control"] == "no-store"
    r = await client.get("/debugger/no-such-thing", headers=CREDS)
    assert r.status == 404
    r = await client.get("/debugger/replay", headers=CREDS)
    assert r.status == 405 and r.headers["Allow"] == "POST"
    r = await client.get("/debugger/events", headers=CREDS)
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    r.close()
    # the rest of the gateway does not care
    assert (await client.get("/health")).status == 200
    await send(client, track("m-1"))


async def test_the_page_is_self_contained(gateway_client: Any) -> None:
    client = await gateway_client(**admin())
    r = await client.get("/debugger", headers=CREDS)
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    html = await r.text()
    assert "This process only" in html and "NATS" in html
    assert 'src="/debugger/page.js"' in html and 'href="/debugger/page.css"' in html
    for path in ("/debugger", "/debugger/page.js", "/debugger/page.css"):
        text = await (await client.get(path, headers=CREDS)).text()
        # nothing from elsewhere: the one URL is the SVG namespace, which is no request
        assert text.replace("http://www.w3.org/2000/svg", "").count("://") == 0, path
        assert "innerHTML" not in text, "what comes from calls is put in the page as text"


# -- the stream: one record per outcome ---------------------------------------------------

async def test_accepted_and_delivered(gateway_client: Any, fake_destination: FakeDestination, streams: Any) -> None:
    client = await gateway_client(**admin([webhook("Hook", fake_destination.url)]))
    s = await streams(client)
    hello = s.records[0]
    assert hello["kind"] == "hello" and hello["process"]["pid"] > 0 and hello["buffer"] > 0
    await send(client, track("m-1", event="Signed Up", properties={"plan": "pro"}))
    [acc] = await s.wait("accepted")
    assert {k: acc[k] for k in ("source", "type", "event", "messageId", "userId")} == \
        {"source": "web", "type": "track", "event": "Signed Up", "messageId": "m-1", "userId": "u1"}
    stored = json.loads(acc["call"])
    assert stored["properties"] == {"plan": "pro"} and stored["receivedAt"] and "writeKey" not in stored
    [dl] = await s.wait("delivered")
    assert {k: dl[k] for k in ("destination", "source", "type", "event", "messageId", "userId")} == \
        {"destination": "Hook", "source": "web", "type": "track", "event": "Signed Up", "messageId": "m-1",
         "userId": "u1"}
    assert acc["at"] <= dl["at"]
    assert fake_destination.delivered()[0]["messageId"] == "m-1"


async def test_rejected_lax_and_strict(gateway_client: Any, streams: Any) -> None:
    client = await gateway_client(**admin())
    s = await streams(client)
    # lax: answered 200, and the record says why it was not stored
    r = await client.post("/v1/track", json={"userId": "u1"}, headers=AUTH_HEADERS)
    assert r.status == 200
    [lax] = await s.wait("rejected", mode="lax")
    assert (lax["source"], lax["reason"], lax["field"]) == ("web", "missing_field", "event")
    assert lax["message"] == "track requires an event name"
    # strict: answered 400, the same record in strict mode
    r = await client.post("/v1/track", json={"userId": "u1"}, headers={**AUTH_HEADERS, "X-Strict-Mode": "1"})
    assert r.status == 400
    [strict] = await s.wait("rejected", mode="strict")
    assert (strict["reason"], strict["field"]) == ("missing_field", "event")
    # a whole request refused: not JSON (lax: 200), a write key no source has (401)
    r = await client.post("/v1/track", data=b"{not json", headers={**AUTH_HEADERS, "Content-Type": "application/json"})
    assert r.status == 200
    [bad] = await s.wait("rejected", reason="json")
    assert bad["mode"] == "lax" and bad["status"] == 400 and bad["source"] == "web"
    r = await client.post("/v1/track", json=track("m-1"), headers={"Authorization": "Bearer not-a-key-000"})
    assert r.status == 200  # lax: even this is answered 200
    [auth] = await s.wait("rejected", reason="auth")
    assert auth["source"] is None and auth["status"] == 401 and auth["mode"] == "lax"
    # a batch: the one bad call by its index, the good one accepted
    await send_batch(client, [track("m-2"), {"type": "track", "userId": "u1", "messageId": "m-3"}])
    [in_batch] = await s.wait("rejected", field="batch[1].event")
    assert in_batch["index"] == 1
    assert [a["messageId"] for a in await s.wait("accepted")] == ["m-2"]
    assert b"not-a-key-000" not in s.raw


async def test_dropped_at_ingest_and_skipped_by_a_destination(gateway_client: Any, make_fake_destination: Any,
                                                              streams: Any) -> None:
    hook, only_ids, filtered = [await make_fake_destination() for _ in range(3)]
    client = await gateway_client(**admin(
        [webhook("Hook", hook.url),
         webhook("OnlyIdentify", only_ids.url, filter={"types": ["identify"]}),
         webhook("NoTests", filtered.url, transforms=[{"type": "deny_events", "settings": {"events": ["Test"]}}])],
        transforms=[{"type": "deny_events", "settings": {"events": ["Spam"]}}]))
    s = await streams(client)
    await send(client, track("m-spam", event="Spam"))
    [dropped] = await s.wait("dropped")
    assert dropped == {**dropped, "source": "web", "reason": "transform:deny_events"}
    await send(client, track("m-1", event="Test"))
    await send(client, track("m-2", event="Bought", integrations={"Hook": False}))
    by_routing = await s.wait("skipped", 2, destination="OnlyIdentify")
    assert [(r["messageId"], r["reason"], r["why"]) for r in by_routing] == [
        ("m-1", "routing", "filter.types does not include 'track'"),
        ("m-2", "routing", "filter.types does not include 'track'")]
    [off] = await s.wait("skipped", destination="Hook")
    assert (off["messageId"], off["reason"], off["why"]) == ("m-2", "routing", "integrations.Hook is False")
    [by_transform] = await s.wait("skipped", destination="NoTests")
    assert (by_transform["messageId"], by_transform["reason"]) == ("m-1", "transform:deny_events")
    await s.wait("delivered", destination="Hook", messageId="m-1")
    await s.wait("delivered", destination="NoTests", messageId="m-2")
    assert not s.of("accepted", messageId="m-spam")


async def test_retried_then_delivered(gateway_client: Any, fake_destination: FakeDestination, streams: Any) -> None:
    # The call's batch fails whole (the queue holds at it): retried with the
    # answer, then delivered.
    fake_destination.script = [status(503, '{"error": "upstream busy"}')]
    client = await gateway_client(**admin([webhook("Hook", fake_destination.url)]))
    s = await streams(client)
    await send(client, track("m-1"))
    [retried] = await s.wait("retried")
    assert (retried["destination"], retried["messageId"], retried["status"]) == ("Hook", "m-1", 503)
    assert "upstream busy" in retried["excerpt"] and retried["reason"] == "HTTP 503"
    assert retried["next_attempt"] >= retried["at"]
    await s.wait("delivered", messageId="m-1")
    status_doc = await (await client.get("/debugger/status", headers=CREDS)).json()
    [hook] = status_doc["destinations"]
    assert hook["last_error"]["status"] == 503 and hook["last_error"]["messageId"] == "m-1"
    assert hook["retried"] == 1 and hook["delivered"] == 1


async def test_per_call_outcomes(gateway_client: Any, fake_destination: FakeDestination, streams: Any,
                                 test_plugins: Path) -> None:
    # A destination with an outcome per call: delivered, retried (503), dead
    # (422) and dead before sending (it cannot map the call), from one batch.
    fake_destination.default = itemized_answers
    client = await gateway_client(**admin([itemized("Items", fake_destination.url)], plugins=["itemized_destination"]))
    s = await streams(client, "?destination=Items")
    await send_batch(client, [track("ok-1"), track("bad-1", properties={"behave": "fail"}),
                              track("flaky-1", properties={"behave": "flaky"}), track("unmappable-1",
                                                                                     event="Unmappable")])
    await s.wait("delivered", messageId="ok-1")
    [bad] = await s.wait("dead_lettered", messageId="bad-1")
    assert (bad["status"], bad["excerpt"], bad["reason"]) == (422, "email is not an email",
                                                              "item 422: email is not an email")
    [unmappable] = await s.wait("dead_lettered", messageId="unmappable-1")
    assert unmappable["status"] is None and unmappable["reason"].startswith("UNMAPPABLE:")
    [flaky] = await s.wait("retried", messageId="flaky-1")
    assert flaky["status"] == 503 and flaky["next_attempt"] > flaky["at"] - 1


async def test_paused_shows_on_the_status_page(gateway_client: Any, fake_destination: FakeDestination, streams: Any,
                                               test_plugins: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery_sender, "PAUSE_MIN", 30.0)
    fake_destination.default = status(401, "bad token")
    client = await gateway_client(**admin([itemized("Items", fake_destination.url)], plugins=["itemized_destination"]))
    s = await streams(client)
    await send(client, track("m-1"))
    [held] = await s.wait("retried")
    assert held["reason"].startswith("paused:") and held["status"] == 401
    doc = await (await client.get("/debugger/status", headers=CREDS)).json()
    [items] = doc["destinations"]
    assert items["paused"] is True and items["held_until"] > doc["at"] + 20
    assert items["last_error"]["status"] == 401 and items["last_error"]["excerpt"] == "bad token"


async def test_dead_letter_listed_and_replayed(gateway_client: Any, fake_destination: FakeDestination,
                                              streams: Any) -> None:
    fake_destination.default = status(400, '{"error": "invalid field: traits"}')
    client = await gateway_client(**admin([webhook("Hook", fake_destination.url)]))
    s = await streams(client)
    await send(client, track("m-1"))
    [dead] = await s.wait("dead_lettered")
    assert (dead["destination"], dead["messageId"], dead["status"], dead["reason"]) == ("Hook", "m-1", 400, "HTTP 400")
    assert "invalid field: traits" in dead["excerpt"]
    async def dead_letters() -> dict[str, Any]:
        return await (await client.get("/debugger/dead-letters", headers=CREDS)).json()

    # (the record is said as the step decides; the dead letter is stored just after)
    deadline = time.monotonic() + 5
    while (listed := await dead_letters())["total"] == 0:
        assert time.monotonic() < deadline, "the dead letter was never stored"
        await asyncio.sleep(0.05)
    assert listed["total"] == 1
    [letter] = listed["letters"]
    assert (letter["destination"], letter["messageId"], letter["status"]) == ("Hook", "m-1", 400)
    assert json.loads(letter["call"])["messageId"] == "m-1"
    doc = await (await client.get("/debugger/status", headers=CREDS)).json()
    assert doc["destinations"][0]["dead"] == 1 and doc["destinations"][0]["last_error"]["status"] == 400
    # replay: what `gateway dlq replay --destination Hook --id m-1` does
    fake_destination.default = status(200)
    r = await client.post("/debugger/replay", json={"destination": "Hook", "messageId": "m-1"}, headers=CREDS)
    assert r.status == 200, await r.text()
    assert (await r.json())["replayed"] == 1
    await s.wait("replayed", messageId="m-1", destination="Hook")
    await s.wait("delivered", messageId="m-1", timeout=5)
    assert [c["messageId"] for c in fake_destination.delivered()] == ["m-1"]
    assert (await dead_letters())["total"] == 0
    # nothing left to replay
    r = await client.post("/debugger/replay", json={"destination": "Hook", "messageId": "m-1"}, headers=CREDS)
    assert r.status == 404 and (await r.json())["replayed"] == 0


async def test_replay_only_from_the_page(gateway_client: Any) -> None:
    client = await gateway_client(**admin())
    r = await client.post("/debugger/replay", data="destination=Hook", headers={
        **CREDS, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 415, "a form on another site cannot replay"
    r = await client.post("/debugger/replay", json={"destination": "Hook"}, headers={
        **CREDS, "Sec-Fetch-Site": "cross-site"})
    assert r.status == 403
    for doc in ({}, {"destination": ""}, {"what": 1}):
        r = await client.post("/debugger/replay", json=doc, headers=CREDS)
        assert r.status == 400, doc
    r = await client.post("/debugger/replay", data=b"x" * 5000, headers={**CREDS, "Content-Type": "application/json"})
    assert r.status == 413


# -- filters ---------------------------------------------------------------------------------

async def test_filters(gateway_client: Any, make_fake_destination: Any, streams: Any) -> None:
    a, b = await make_fake_destination(), await make_fake_destination()
    client = await gateway_client(**admin([webhook("A", a.url), webhook("B", b.url)], sources=[
        {"name": "web", "write_keys": [WRITE_KEY]}, {"name": "app", "write_keys": ["app-key-0001"]}]))
    every = await streams(client)
    only = {q: await streams(client, q) for q in (
        "?source=app", "?destination=B", "?type=identify", "?event=Bought", "?userId=u2",
        "?type=track&userId=u2", "?event=Bought&destination=A")}
    await send(client, track("w-1", event="Bought"))
    await send(client, {"type": "identify", "userId": "u2", "messageId": "w-2", "traits": {}})
    r = await client.post("/v1/track", json=track("p-1", event="Viewed", userId="u2"),
                          headers={"Authorization": "Bearer app-key-0001"})
    assert r.status == 200
    await every.wait("delivered", 6)
    await asyncio.sleep(0.3)  # anything a filter let through wrongly would be here by now

    def seen(s: Any) -> set[tuple[str, str, str | None]]:
        return {(r["kind"], r["messageId"], r.get("destination")) for r in s.records if r["kind"] != "hello"}

    def both(mid: str) -> set[tuple[str, str, str | None]]:
        return {("accepted", mid, None), ("delivered", mid, "A"), ("delivered", mid, "B")}

    assert seen(every) == both("w-1") | both("w-2") | both("p-1")
    assert seen(only["?source=app"]) == both("p-1")
    # a destination filter keeps what ingest did: a call's story starts there
    assert seen(only["?destination=B"]) == {("accepted", m, None) for m in ("w-1", "w-2", "p-1")} | \
        {("delivered", m, "B") for m in ("w-1", "w-2", "p-1")}
    assert seen(only["?type=identify"]) == both("w-2")
    assert seen(only["?event=Bought"]) == both("w-1")
    assert seen(only["?userId=u2"]) == both("w-2") | both("p-1")
    assert seen(only["?type=track&userId=u2"]) == both("p-1")
    assert seen(only["?event=Bought&destination=A"]) == {("accepted", "w-1", None), ("delivered", "w-1", "A")}
    assert only["?type=identify"].records[0]["filters"] == {"type": "identify"}


# -- costs and bounds -----------------------------------------------------------------------

async def test_nothing_is_built_while_nobody_watches(gateway_client: Any, fake_destination: FakeDestination,
                                                     streams: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    real = ActivityFeed.publish

    def counting(self: ActivityFeed, kind: str, **fields: Any) -> None:
        made.append(kind)
        real(self, kind, **fields)
    monkeypatch.setattr(ActivityFeed, "publish", counting)
    monkeypatch.setattr(debugger_stream, "LIVENESS", 0.1)
    fake_destination.script = [status(503)]
    client = await gateway_client(**admin([webhook("Hook", fake_destination.url)]))
    await send_batch(client, [track("m-1"), {"type": "track", "userId": "u1"}])
    await wait_until(lambda: len(fake_destination.delivered()) == 1, what="the call to be delivered")
    assert made == [], "no watcher: no record is built"
    s = await streams(client)
    await send(client, track("m-2"))
    await s.wait("delivered")
    assert made == ["accepted", "delivered"]
    await s.close()
    feed = feed_of(client)
    await wait_until(lambda: not feed.watched, timeout=3, what="the watcher to go with its reader")
    await send(client, track("m-3"))
    await wait_until(lambda: len(fake_destination.delivered()) == 3, what="m-3 delivered")
    assert made == ["accepted", "delivered"]


async def test_heartbeat(gateway_client: Any, streams: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debugger_stream, "HEARTBEAT", 0.2)
    monkeypatch.setattr(debugger_stream, "LIVENESS", 0.1)
    client = await gateway_client(**admin())
    s = await streams(client)
    await wait_until(lambda: len(s.comments) >= 2, what="two heartbeats", timeout=5, event=s.arrived,
                     seen=lambda: s.comments)
    assert set(s.comments) == {b": heartbeat"}
    assert s.raw.startswith(b"retry: ")


async def test_a_reader_too_slow_loses_records_and_is_told(gateway_client: Any, streams: Any) -> None:
    # One batch of 300 calls publishes 300 records in one turn of the loop; a
    # watcher holding 50 keeps the newest 50 and says how many went.
    client = await gateway_client(**admin())
    feed_of(client).buffer_size = 50
    s = await streams(client)
    await send_batch(client, [track(f"m-{i}") for i in range(300)])
    [overflow] = await s.wait("overflow")
    assert (overflow["dropped"], overflow["dropped_total"]) == (250, 250)
    got = await s.wait("accepted", 50)
    assert [r["messageId"] for r in got] == [f"m-{i}" for i in range(250, 300)]
    assert s.records.index(overflow) < s.records.index(got[0]), "the notice comes before what followed the loss"
    await send(client, track("m-300"))
    await s.wait("accepted", 51)
    assert len(s.of("overflow")) == 1, "one notice a loss"


async def test_a_reader_that_stops_reading_holds_no_memory_and_is_dropped(
        gateway_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A reader whose socket never drains: the watcher's buffer stays at its
    # bound, what the server's socket holds stays at about one write, ingest
    # goes on, and after WRITE_TIMEOUT the connection is cut and the watcher gone.
    monkeypatch.setattr(debugger_stream, "WRITE_TIMEOUT", 1.5)
    client = await gateway_client(**admin())
    feed = feed_of(client)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", client.port))
    auth = CREDS["Authorization"]
    await loop.sock_sendall(sock, f"GET /debugger/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\n"
                                  f"\r\n".encode())
    await wait_until(lambda: feed.watched, what="the watcher")
    [watcher] = feed.watchers
    server = client.server.runner.server
    big = "x" * 8000
    held_at_most = 0
    started = time.monotonic()
    published = 0
    try:
        while feed.watchers and time.monotonic() - started < 20:
            for _ in range(200):
                feed.publish("accepted", messageId=f"m-{published}", call=big)
                published += 1
            assert len(watcher.buffer) <= watcher.buffer.maxlen
            held_at_most = max(held_at_most, sum(h.transport.get_write_buffer_size() for h in server.connections
                                                  if h.transport is not None))
            await asyncio.sleep(0.01)
        took = time.monotonic() - started
        assert not feed.watchers, "the reader that never read is still watched"
        assert published * len(big) > 50_000_000, "the test did not publish enough to mean anything"
        assert watcher.dropped > published // 2
        assert held_at_most < 1_000_000, f"the server's socket held {held_at_most} bytes for one reader"
        assert took < 10, took
        await send(client, track("m-after"))  # and ingest never noticed
        sock.setblocking(True)
        sock.settimeout(5)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass  # aborted: what the server held was thrown away
        assert len(got) < 10_000_000
    finally:
        sock.close()


async def test_streams_of_a_served_gateway_end_with_their_reader_and_at_shutdown(gateway_process: Any) -> None:
    # `gateway serve` does not cancel a handler whose client went away (the
    # test server does): the stream must notice by itself; and an open
    # stream must not hold up SIGTERM for server.shutdown_timeout.
    gw = await gateway_process(**admin(server={"shutdown_timeout": 8.0}))
    async with aiohttp.ClientSession() as http:
        async def watchers() -> int:
            async with http.get(f"{gw.url}/debugger/status", headers=CREDS) as r:
                return int((await r.json())["watchers"])

        resp = await http.get(f"{gw.url}/debugger/events", headers=CREDS)
        assert resp.status == 200
        await resp.content.readline()
        assert await watchers() == 1
        resp.close()
        deadline = time.monotonic() + 5
        while await watchers():
            assert time.monotonic() < deadline, "the watcher outlived its reader"
            await asyncio.sleep(0.1)
        resp = await http.get(f"{gw.url}/debugger/events", headers=CREDS)
        await resp.content.readline()
        assert gw.proc is not None
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(resp.content.read(), 10)  # the stream ends: the server closed it
        code = await asyncio.get_running_loop().run_in_executor(None, gw.proc.wait, 15)
        took = time.monotonic() - started
        resp.close()
    assert code == 0 and took < 4, (code, took, rest[-200:])


# -- secrets ---------------------------------------------------------------------------------------

async def test_write_keys_and_admin_credentials_never_leave(gateway_client: Any, fake_destination: FakeDestination,
                                                             streams: Any) -> None:
    fake_destination.default = status(400, f'{{"error": "bad call", "echo": "{WRITE_KEY}"}}')
    client = await gateway_client(**admin([{**webhook("Hook", fake_destination.url), "settings": {
        "url": fake_destination.url, "headers": {"Authorization": f"Bearer {DEST_SECRET}"}}}], sources=[
        {"name": "web", "write_keys": [WRITE_KEY]},
        {"name": "classic", "kind": "track_api", "track_api": {"site_id": "site-1", "api_key": TRACK_API_KEY}}]))
    s = await streams(client)
    # the key in the body (as the browser SDKs send it), in a property, and
    # the password too; a wrong key; a lax rejection
    await send(client, track("m-1", writeKey=WRITE_KEY,
                             properties={"note": f"key {WRITE_KEY} pw {ADMIN_PASSWORD} track {TRACK_API_KEY}"}))
    r = await client.post("/v1/track", json={"userId": "u1", "writeKey": WRITE_KEY},
                          headers={"Content-Type": "application/json"})
    assert r.status == 200
    await s.wait("rejected")
    [dead] = await s.wait("dead_lettered")
    assert "[redacted]" in dead["excerpt"]
    [acc] = await s.wait("accepted")
    assert json.loads(acc["call"])["properties"]["note"] == "key [redacted] pw [redacted] track [redacted]"
    texts = [bytes(s.raw).decode()]
    for path in ("/debugger", "/debugger/page.js", "/debugger/page.css", "/debugger/status", "/debugger/dead-letters"):
        texts.append(await (await client.get(path, headers=CREDS)).text())
    r = await client.post("/debugger/replay", json={"destination": "Hook"}, headers=CREDS)
    texts.append(await r.text())
    token = CREDS["Authorization"].split()[1]
    for text in texts:
        for secret in (WRITE_KEY, ADMIN_PASSWORD, ADMIN_USER, token, DEST_SECRET, TRACK_API_KEY):
            assert secret not in text, (secret, text[:2000])
