"""The three Node.js server SDKs against a live gateway (issue 12, point 4).

Segment's ``@segment/analytics-node``, Customer.io's
``@customerio/cdp-analytics-node`` and RudderStack's
``@rudderstack/rudder-sdk-node``, at the versions pinned in
tests/node/package.json, unchanged, driven by tests/node/drive.mjs.  Each
sends identify, track, page, screen, group and alias, every one with traits
or properties, a context and an integrations object, to ``gateway serve``;
a webhook destination hands them to the kit's ``fake_destination``, where
every field sent must be found as sent.  A recording proxy between SDK and gateway keeps
each request as it left the SDK (raw bytes, gzip included: RudderStack's SDK
gzips by default and labels the body ``application/x-www-form-urlencoded``).

They need Node.js >= 20 and the packages of tests/node:

    cd tests/node && npm ci

Without them they skip and say so; with ``REQUIRE_BROWSER_TESTS=1`` in the
environment (CI, scripts/test on a machine that has them) they fail instead.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import gzip
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from node_tools import node_problem, skip_without
from gateway.testing import WRITE_KEY, FakeDestination

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"
DRIVER = NODE_DIR / "drive.mjs"
PACKAGES = {"segment": "@segment/analytics-node", "customerio": "@customerio/cdp-analytics-node",
            "rudderstack": "@rudderstack/rudder-sdk-node"}
#: the library name each SDK puts in context.library
LIBRARY = {"segment": "@segment/analytics-node", "customerio": "@customerio/cdp-analytics-node",
           "rudderstack": "analytics-node"}
RUN_TIMEOUT = 30.0


@functools.lru_cache(maxsize=1)
def _node_missing() -> str | None:
    return node_problem("@segment/analytics-node 3", NODE_DIR, tuple(PACKAGES.values()))


def need_node() -> None:
    skip_without(_node_missing())


def pinned_version(sdk: str) -> str:
    return str(json.loads((NODE_DIR / "package.json").read_text())["dependencies"][PACKAGES[sdk]])


async def drive(sdk: str, host: str, calls: list[dict[str, Any]], tmp_path: Path,
                options: dict[str, Any] | None = None, timeout: float = RUN_TIMEOUT,
                write_key: str = WRITE_KEY) -> dict[str, Any]:
    """Run drive.mjs; → its report (results per call, errors, unhandled rejections)."""
    report = tmp_path / f"report-{sdk}.json"
    report.unlink(missing_ok=True)
    spec = {"sdk": sdk, "host": host, "writeKey": write_key, "calls": calls, "options": options or {},
            "report": str(report), "timeoutMs": int(timeout * 1000), "closeTimeoutMs": int(timeout * 1000) - 5000}
    proc = await asyncio.create_subprocess_exec(
        "node", str(DRIVER), json.dumps(spec), cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout + 10)
    except asyncio.TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
    assert report.is_file(), f"the driver wrote no report (exit {proc.returncode}):\n{out!r}\n{err!r}"
    doc: dict[str, Any] = json.loads(report.read_text())
    doc["exit"] = proc.returncode
    doc["output"] = (out + err).decode(errors="replace")[-4000:]
    return doc


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes  # as the SDK sent it (still gzip'd when it was)
    status: int

    def json(self) -> Any:
        raw = gzip.decompress(self.body) if self.headers.get("Content-Encoding") == "gzip" else self.body
        return json.loads(raw)


class RecordingProxy:
    """Between an SDK and the gateway: passes every request on byte for byte
    (its own server and client do not inflate), and keeps a copy."""

    HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "te",
                     "trailer", "proxy-connection", "host"})

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.seen: list[Seen] = []
        self.http: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self.HOP}
        if self.http is None:
            self.http = aiohttp.ClientSession(auto_decompress=False)
        async with self.http.request(request.method, self.upstream + request.path_qs, data=body or None,
                                     headers=headers, allow_redirects=False,
                                     skip_auto_headers=("Content-Type", "User-Agent")) as r:
            answer = await r.read()
            out = {k: v for k, v in r.headers.items() if k.lower() not in self.HOP}
        self.seen.append(Seen(request.method, request.path, dict(request.headers), body, r.status))
        return web.Response(status=r.status, body=answer, headers=out)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()


@pytest.fixture
async def proxy_to(aiohttp_server: Any) -> Any:
    """``await proxy_to(gateway_url)`` → (proxy, its URL)."""
    made: list[RecordingProxy] = []

    async def make(upstream: str) -> tuple[RecordingProxy, str]:
        p = RecordingProxy(upstream)
        made.append(p)
        server = await aiohttp_server(p.app(), auto_decompress=False)
        return p, str(server.make_url("")).rstrip("/")

    yield make
    for p in made:
        await p.close()


def to_sink(fake: FakeDestination) -> str:
    """Two webhook destinations on the fake: "Sink" at /hook, "Elsewhere" at /elsewhere."""
    return f"""
        destinations:
          - name: Sink
            type: webhook
            settings: {{url: "{fake.url}"}}
            batch: {{max_wait: 0}}
          - name: Elsewhere
            type: webhook
            settings: {{url: "{fake.url.replace('/hook', '/elsewhere')}"}}
            batch: {{max_wait: 0}}
        """


# -- the calls ---------------------------------------------------------------------------------

#: routes to "Sink" only: a gateway that ignored the object would also post to /elsewhere
INTEGRATIONS = {"All": False, "Sink": True, "Amplitude": {"session_id": 1717171717}, "Mixpanel": False}
CONTEXT = {"app": {"name": "shop", "version": "2.3.1", "build": "451"},
           "campaign": {"name": "spring", "source": "newsletter", "medium": "email"},
           "locale": "de-DE", "timezone": "Europe/Berlin", "ip": "198.51.100.7",
           "device": {"id": "dev-1", "manufacturer": "Acme", "type": "server"},
           "custom": {"nested": {"list": [1, "two", None, True, 2.5, {"deep": "yes"}]}, "empty": {}}}
TIMESTAMP = "2024-05-06T07:08:09.123Z"


def calls_for(sdk: str) -> list[dict[str, Any]]:
    """identify, track, page, screen, group and alias, each with every kind
    of JSON value; messageIds are the test's, so each call can be found."""
    base = {"context": CONTEXT, "integrations": INTEGRATIONS, "timestamp": TIMESTAMP}
    calls: list[dict[str, Any]] = [
        {"type": "identify", "userId": "user-42", "anonymousId": "anon-42",
         "traits": {"email": "zoe@example.com", "name": "Zoë ✓ 日本 🚀", "plan": "pro", "logins": 42,
                    "vip": True, "score": 0.75, "address": {"city": "Köln", "postalCode": "50667"}, "tags": ["a", "b"],
                    "nothing": None, "big": 9007199254740991}},
        {"type": "track", "userId": "user-42", "event": "Order Completed",
         "properties": {"order_id": "o-1", "revenue": 42.5, "currency": "EUR", "coupon": None,
                        "products": [{"sku": "s-1", "quantity": 2, "price": 19.99}, {"sku": "s-2", "quantity": 1}],
                        "quote": "she said \"hi\" \\ bye", "newline": "a\nb\tc"}},
        {"type": "page", "userId": "user-42", "category": "Docs", "name": "Install",
         "properties": {"url": "https://shop.example/docs/install?x=1", "path": "/docs/install",
                        "title": "Install", "referrer": "https://search.example/"}},
        {"type": "screen", "userId": "user-42", "name": "Settings",
         "properties": {"tab": "privacy", "variant": 3}},
        {"type": "group", "userId": "user-42", "groupId": "org-7",
         "traits": {"name": "Acme GmbH", "plan": "enterprise", "employees": 120, "industry": None}},
        {"type": "alias", "userId": "user-42", "previousId": "anon-42"},
    ]
    if sdk != "rudderstack":
        calls[3]["category"] = "App"  # Segment's screen(): name and category
    return [{**base, **c, "messageId": f"{sdk}-{c['type']}-1"} for c in copy.deepcopy(calls)]


#: what the gateway adds to a call (docs/pipelines-api.md, "Enrichment")
ENRICHMENT = frozenset({"receivedAt", "timestamp", "originalTimestamp", "sentAt"})


def assert_time_kept(client_time: str, as_sent: dict[str, Any], got: dict[str, Any], where: str) -> None:
    """The client's ``timestamp`` becomes ``originalTimestamp`` unless the SDK
    sent one of its own (RudderStack's: the time of the call), and
    ``timestamp`` is it corrected for clock skew: within seconds of it here."""
    if "originalTimestamp" in as_sent:
        assert got["originalTimestamp"] == as_sent["originalTimestamp"], (where, got)
    else:
        assert got["originalTimestamp"] == client_time, (where, got)
    skew = datetime.fromisoformat(got["timestamp"]) - datetime.fromisoformat(client_time)
    assert abs(skew.total_seconds()) < 60, (where, got["timestamp"], client_time)


def assert_intact(given: dict[str, Any], as_sent: dict[str, Any], got: dict[str, Any], sdk: str) -> None:
    """``given``: the call as the test handed it to the SDK; ``as_sent``: as
    the SDK sent it (the proxy's copy); ``got``: as the destination got it.

    The gateway changes nothing the SDK sent but ``writeKey`` and
    ``_metadata`` (dropped) and adds only its enrichment; and everything the
    test gave arrives: ids, names, the integrations object exactly, each
    context key, trait and property with its value (SDKs may add some: the
    library, Segment's page category in properties, RudderStack's copy of
    identify traits in context.traits), the client's time as originalTimestamp."""
    where = f"{sdk} {given['type']}"
    kept = {k: v for k, v in as_sent.items() if k not in ("writeKey", "_metadata")}
    for key, value in kept.items():
        if key == "timestamp":
            assert_time_kept(value, kept, got, where)
        elif key == "sentAt" and "sentAt" in got:
            continue  # the batch's sentAt may stand in for the call's own
        else:
            assert got.get(key) == value, (where, "changed on the way", key, got.get(key), value)
    assert set(got) - set(kept) <= ENRICHMENT, (where, set(got) - set(kept))
    assert "writeKey" not in got and "_metadata" not in got, where
    assert got["receivedAt"].endswith("Z") and got["timestamp"], where

    for key, value in given.items():
        if key in ("context", "traits", "properties"):
            for k, v in value.items():
                assert got[key].get(k) == v, (where, f"{key}.{k}", got[key].get(k), v)
        elif key == "timestamp":
            assert_time_kept(value, as_sent, got, where)
        else:
            assert got.get(key) == value, (where, key, got.get(key), value)
    lib = got["context"]["library"]
    assert lib["name"] == LIBRARY[sdk] and lib["version"], (where, lib)


# -- the tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sdk,options", [
    ("segment", {}),
    ("customerio", {}),
    ("rudderstack", {}),                 # gzip, by default
    ("rudderstack", {"gzip": False}),
], ids=["segment", "customerio", "rudderstack-gzip", "rudderstack-plain"])
async def test_node_sdk_sends_every_call_intact(sdk: str, options: dict[str, Any], fake_destination: FakeDestination,
                                                gateway_process: Any, proxy_to: Any, tmp_path: Path) -> None:
    need_node()
    gw = await gateway_process(to_sink(fake_destination))
    proxy, url = await proxy_to(gw.url)
    calls = calls_for(sdk)
    report = await drive(sdk, url, calls, tmp_path, {"flushInterval": 200, **options})

    def why() -> str:
        return (f"\n--- report: {json.dumps({k: v for k, v in report.items() if k != 'output'}, indent=1)}"
                f"\n--- driver output:\n{report['output']}"
                f"\n--- requests: {[(s.method, s.path, s.status, s.headers) for s in proxy.seen]}"
                f"\n--- fake destination: {msgspec.json.encode(fake_destination.requests).decode()[:3000]}"
                f"\n--- gateway log:\n{gw.log_tail(3000)}")

    assert report["exit"] == 0 and not report["timedOut"], why()
    assert report["version"] == pinned_version(sdk), why()
    assert report["errors"] == [] and report["unhandled"] == [], why()
    assert [(r["type"], r["messageId"], r["error"]) for r in report["results"]] == \
        [(c["type"], c["messageId"], None) for c in calls], why()

    # What left the SDK: POST /v1/batch, Basic auth with the key, answered 200.
    posts = [s for s in proxy.seen if s.method == "POST"]
    assert posts and all(s.path == "/v1/batch" and s.status == 200 for s in posts), why()
    basic = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    assert all(s.headers.get("Authorization") == basic for s in posts), why()
    if sdk == "rudderstack" and options.get("gzip") is not False:
        for s in posts:
            assert s.headers.get("Content-Encoding") == "gzip", s.headers
            assert s.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"), s.headers
            assert s.body[:2] == b"\x1f\x8b", "gzip bytes, passed on as sent"
    else:
        assert all("Content-Encoding" not in s.headers for s in posts), why()
        assert all(s.headers.get("Content-Type", "").startswith("application/json") for s in posts), why()
    sent_ids = [c["messageId"] for s in posts for c in s.json()["batch"]]
    assert sorted(sent_ids) == sorted(c["messageId"] for c in calls), why()

    # What the destination got: each call once, every field intact, routed by integrations.
    got = await fake_destination.wait_delivered(len(calls), timeout=15)
    await fake_destination.wait_quiet()  # a duplicate would show up now
    assert sorted(c["messageId"] for c in fake_destination.delivered()) == sorted(c["messageId"] for c in calls), \
        why()
    assert {r.path for r in fake_destination.requests} == {"/hook"}, "Elsewhere is off in every integrations object"
    by_id = {c["messageId"]: c for c in got}
    as_sent = {c["messageId"]: c for s in posts for c in s.json()["batch"]}
    for call in calls:
        assert_intact(call, as_sent[call["messageId"]], by_id[call["messageId"]], sdk)


async def test_node_sdks_with_a_wrong_key_under_server_strict(fake_destination: FakeDestination,
                                                              gateway_process: Any, proxy_to: Any,
                                                              tmp_path: Path) -> None:
    """server.strict: a mistyped key is a 401 each SDK sees as a failed call
    (Customer.io's cannot send X-Strict-Mode); nothing is stored or sent on."""
    need_node()
    gw = await gateway_process("\n        server: {strict: true}" + to_sink(fake_destination))
    proxy, url = await proxy_to(gw.url)
    for sdk in PACKAGES:
        call = {**calls_for(sdk)[1], "messageId": f"{sdk}-wrong-key"}
        retries = {"retryCount": 1} if sdk == "rudderstack" else {"maxRetries": 1}
        report = await drive(sdk, url, [call], tmp_path, {"flushInterval": 100, **retries}, write_key="typo")
        [result] = report["results"]
        assert result["error"], (sdk, report)
    statuses = {(s.path, s.status) for s in proxy.seen if s.method == "POST"}
    assert statuses == {("/v1/batch", 401)}, statuses
    assert all(s.json() is not None for s in proxy.seen)
    await fake_destination.wait_quiet()
    assert fake_destination.requests == []
