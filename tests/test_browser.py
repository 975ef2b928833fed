"""Browser SDKs against the gateway (issue 5).

Two kinds of test:

* In-process (``gateway_client``): the settings documents, CORS on them,
  preflights, the short paths and ``POST /v1/m``.
* Real browsers: Segment's ``@segment/analytics-next`` and Customer.io's
  ``@customerio/cdp-analytics-browser``, unchanged, in Debian's headless
  Chromium driven by ``playwright-core`` (``tests/browser/drive.mjs``). A page
  served from one origin loads the SDK, which fetches its settings from the
  gateway (another origin) and sends identify, track, page, screen, group and
  alias; a ``webhook`` destination hands them to the ``sink``, where we check
  that each arrived once with ``context.page``, ``context.userAgent`` and
  ``context.library`` intact and no ``_metadata``.

The browser tests need Node.js >= 20 (the machine's), Debian's Chromium and
the Node packages of tests/browser:

    apt-get update && apt-get install -y chromium
    cd tests/browser && npm ci

Without them they skip and say so; with ``REQUIRE_BROWSER_TESTS=1`` in the
environment they fail instead.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from node_tools import CHROMIUM, node_problem, skip_without
from gateway.testing import WRITE_KEY, FakeDestination

ROOT = Path(__file__).resolve().parent.parent
BROWSER_DIR = ROOT / "tests" / "browser"
PAGES = BROWSER_DIR / "pages"
NODE_PACKAGES = ("playwright-core", "@segment/analytics-next", "@customerio/cdp-analytics-browser")
SEGMENT_DIST = BROWSER_DIR / "node_modules" / "@segment" / "analytics-next" / "dist" / "umd"
CUSTOMERIO_DIST = BROWSER_DIR / "node_modules" / "@customerio" / "cdp-analytics-browser" / "dist" / "umd"
SIX = {"identify", "track", "page", "screen", "group", "alias"}
#: one browser run, from launching Chromium to the last call at the sink
RUN_TIMEOUT = 45.0


@functools.lru_cache(maxsize=1)
def _browser_missing() -> str | None:
    return node_problem("playwright-core", BROWSER_DIR, NODE_PACKAGES, chromium=True)


def _need_browser() -> None:
    skip_without(_browser_missing())


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


# ---------------------------------------------------------------------------
# In-process: settings documents, CORS, short paths, /v1/m
# ---------------------------------------------------------------------------

ORIGIN = "https://shop.example"
SETTINGS = {"Segment.io": "/v1/projects/{key}/settings",
            "Customer.io Data Pipelines": "/customerio/v1/projects/{key}/settings"}


@pytest.mark.parametrize("integration,path", SETTINGS.items())
async def test_settings_document_names_only_its_own_sdk(gateway_client: Any, integration: str, path: str) -> None:
    client = await gateway_client()
    r = await client.get(path.format(key=WRITE_KEY))
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("application/json")
    doc = await r.json()
    assert list(doc["integrations"]) == [integration]
    own = doc["integrations"][integration]
    assert own["apiKey"] == WRITE_KEY
    assert own["apiHost"] == f"127.0.0.1:{client.port}/v1"
    assert own["protocol"] == "http"
    assert doc["metrics"]["sampleRate"] == 0
    assert doc["metrics"]["host"] == own["apiHost"]  # never the vendor's
    # nothing that makes either SDK download code from a vendor CDN
    assert not doc.get("remotePlugins")
    assert not doc.get("enabledMiddleware")
    assert not doc.get("middlewareSettings", {}).get("routingRules")
    assert not doc.get("legacyVideoPluginsEnabled")


@pytest.mark.parametrize("path", SETTINGS.values())
async def test_settings_unknown_write_key_is_404(gateway_client: Any, path: str) -> None:
    client = await gateway_client()
    r = await client.get(path.format(key="no-such-key"), headers={"Origin": ORIGIN})
    assert r.status == 404
    # the browser can still read why
    assert r.headers.get("Access-Control-Allow-Origin") == ORIGIN


@pytest.mark.parametrize("path", SETTINGS.values())
async def test_settings_public_url_wins(gateway_client: Any, path: str) -> None:
    client = await gateway_client(server={"public_url": "https://events.example.com/",
                                          "trusted_proxies": ["127.0.0.1"]})
    r = await client.get(path.format(key=WRITE_KEY),
                         headers={"X-Forwarded-Host": "other.example", "X-Forwarded-Proto": "http"})
    own = next(iter((await r.json())["integrations"].values()))
    assert own["apiHost"] == "events.example.com/v1"
    assert own["protocol"] == "https"


@pytest.mark.parametrize("public_url,api_host,protocol", [
    ("http://gw.internal:8080", "gw.internal:8080/v1", "http"),
    ("https://example.com/events/", "example.com/events/v1", "https"),  # behind a path prefix
    ("events.example.com", "events.example.com/v1", "https"),  # no scheme: https
    ("HTTPS://Events.example.com", "Events.example.com/v1", "https"),
])
async def test_settings_public_url_forms(gateway_client: Any, public_url: str, api_host: str,
                                         protocol: str) -> None:
    client = await gateway_client(server={"public_url": public_url})
    own = (await (await client.get(f"/v1/projects/{WRITE_KEY}/settings")).json())["integrations"]["Segment.io"]
    assert (own["apiHost"], own["protocol"]) == (api_host, protocol)


async def test_settings_forwarded_host_from_trusted_proxy(gateway_client: Any) -> None:
    client = await gateway_client(server={"trusted_proxies": ["127.0.0.0/8"]})
    r = await client.get(f"/customerio/v1/projects/{WRITE_KEY}/settings",
                         headers={"X-Forwarded-Host": "events.example.com, proxy2.internal",
                                  "X-Forwarded-Proto": "https"})
    own = (await r.json())["integrations"]["Customer.io Data Pipelines"]
    assert own["apiHost"] == "events.example.com/v1"
    assert own["protocol"] == "https"


async def test_settings_forwarded_host_ignored_from_untrusted_peer(gateway_client: Any) -> None:
    client = await gateway_client(server={"trusted_proxies": ["10.0.0.0/8"]})
    r = await client.get(f"/v1/projects/{WRITE_KEY}/settings",
                         headers={"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"})
    own = (await r.json())["integrations"]["Segment.io"]
    assert own["apiHost"] == f"127.0.0.1:{client.port}/v1"
    assert own["protocol"] == "http"


async def test_settings_ignores_forwarded_proto_that_is_not_http(gateway_client: Any) -> None:
    client = await gateway_client(server={"trusted_proxies": ["127.0.0.1"]})
    r = await client.get(f"/v1/projects/{WRITE_KEY}/settings",
                         headers={"X-Forwarded-Proto": "wss", "X-Forwarded-Host": "events.example.com"})
    own = (await r.json())["integrations"]["Segment.io"]
    assert (own["apiHost"], own["protocol"]) == ("events.example.com/v1", "http")


#: origins come from the source alone
NO_SERVER_ORIGINS = {"cors_origins": []}
WEB_ONLY_AT_ORIGIN = [{"name": "web", "write_keys": [WRITE_KEY], "cors_origins": [ORIGIN]}]


async def test_settings_uses_request_host_header(gateway_client: Any) -> None:
    client = await gateway_client()
    r = await client.get(f"/v1/projects/{WRITE_KEY}/settings", headers={"Host": "analytics.example:8443"})
    own = (await r.json())["integrations"]["Segment.io"]
    assert own["apiHost"] == "analytics.example:8443/v1"


async def test_settings_get_carries_cors_for_allowed_origin_only(gateway_client: Any) -> None:
    client = await gateway_client(server=NO_SERVER_ORIGINS, sources=[
        *WEB_ONLY_AT_ORIGIN, {"name": "other", "write_keys": ["other-key"], "cors_origins": ["https://other.example"]}])
    r = await client.get(f"/v1/projects/{WRITE_KEY}/settings", headers={"Origin": ORIGIN})
    assert r.status == 200
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Origin" in r.headers.get("Vary", "")
    # the other source's origin may not read this source's settings
    r = await client.get(f"/v1/projects/{WRITE_KEY}/settings", headers={"Origin": "https://other.example"})
    assert r.status == 200
    assert "Access-Control-Allow-Origin" not in r.headers


async def test_settings_wildcard_origin(gateway_client: Any) -> None:
    client = await gateway_client()  # server.cors_origins defaults to ["*"]
    r = await client.get(f"/customerio/v1/projects/{WRITE_KEY}/settings", headers={"Origin": ORIGIN})
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN


@pytest.mark.parametrize("path", ["/v1/t", "/v1/i", "/v1/b", "/v1/track", "/v1/batch", "/v1/m"])
async def test_preflight(gateway_client: Any, path: str) -> None:
    client = await gateway_client(server=NO_SERVER_ORIGINS, sources=WEB_ONLY_AT_ORIGIN)
    r = await client.options(path, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-retry-count"})
    assert r.status == 204
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert r.headers["Access-Control-Allow-Methods"] == "POST"
    allowed = {h.strip() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "x-retry-count"} <= allowed
    assert "*" not in allowed  # a wildcard does not cover Authorization
    assert int(r.headers["Access-Control-Max-Age"]) > 0
    assert "Access-Control-Allow-Private-Network" not in r.headers
    # Chromium's Private Network Access preflight
    r = await client.options(path, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Private-Network": "true"})
    assert r.status == 204
    assert r.headers["Access-Control-Allow-Private-Network"] == "true"
    r = await client.options(path, headers={"Origin": "https://evil.example",
                                            "Access-Control-Request-Method": "POST"})
    assert r.status == 403
    assert "Access-Control-Allow-Origin" not in r.headers


def to_sink(sink: FakeDestination) -> list[dict[str, Any]]:
    """``destinations``: one webhook destination posting each call to ``sink`` at once."""
    return [{"name": "Sink", "type": "webhook", "settings": {"url": sink.url}, "batch": {"max_wait": 0}}]


@pytest.mark.parametrize("short,long", [("i", "identify"), ("t", "track"), ("p", "page"), ("s", "screen"),
                                        ("g", "group"), ("a", "alias")])
async def test_short_paths_are_aliases(gateway_client: Any, fake_destination: FakeDestination, short: str,
                                      long: str) -> None:
    sink = fake_destination
    client = await gateway_client(destinations=to_sink(sink))
    body = {"anonymousId": "anon-1", "userId": "u-1", "event": "E", "groupId": "g-1", "previousId": "u-1",
            "writeKey": WRITE_KEY, "_metadata": {"bundled": ["Segment.io"], "unbundled": []},
            "context": {"library": {"name": "analytics.js", "version": "npm:next-1.84.3"}}}
    for path in (f"/v1/{short}", f"/v1/{long}"):
        # text/plain, key only in the body: what the browser SDKs send
        r = await client.post(path, data=json.dumps(body), headers={"Content-Type": "text/plain",
                                                                    "Origin": ORIGIN})
        assert r.status == 200, await r.text()
        assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
        # strict mode sees it as valid too (alias with userId == previousId included)
        r = await client.post(path, data=json.dumps(body), headers={"Content-Type": "text/plain",
                                                                    "X-Strict-Mode": "1"})
        assert r.status == 200, await r.text()
    calls = await sink.wait_delivered(4)
    assert [c["type"] for c in calls] == [long] * 4
    for c in calls:
        assert "_metadata" not in c and "writeKey" not in c


async def test_short_batch_path(gateway_client: Any, fake_destination: FakeDestination) -> None:
    sink = fake_destination
    client = await gateway_client(destinations=to_sink(sink))
    body = {"batch": [{"type": "track", "anonymousId": "a", "event": "E", "_metadata": {"bundled": []}},
                      {"type": "identify", "anonymousId": "a", "traits": {"k": 1}}],
            "writeKey": WRITE_KEY, "sentAt": "2024-01-01T00:00:00.000Z"}
    r = await client.post("/v1/b", data=json.dumps(body), headers={"Content-Type": "text/plain",
                                                                   "Authorization": basic(WRITE_KEY)})
    assert r.status == 200, await r.text()
    calls = await sink.wait_delivered(2)
    assert [c["type"] for c in calls] == ["track", "identify"]
    assert all("_metadata" not in c for c in calls)


async def test_sdk_metrics_endpoint_counted(gateway_client: Any) -> None:
    client = await gateway_client()
    report = {"series": [{"type": "Counter", "metric": "analytics_js.invoke.error", "value": 1,
                          "tags": {"library": "analytics.js"}}]}
    for _ in range(2):
        r = await client.post("/v1/m", data=json.dumps(report), headers={"Content-Type": "text/plain",
                                                                         "Origin": ORIGIN})
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    # even one the gateway cannot read is answered 200: the SDK does not care
    r = await client.post("/v1/m", data=b"not json")
    assert r.status == 200
    text = await (await client.get("/metrics")).text()
    assert re.search(r"^gateway_sdk_metrics_total 3\.0$", text, re.M), text


# ---------------------------------------------------------------------------
# Real browsers
# ---------------------------------------------------------------------------

class PageServer:
    """The web site: the test pages and the SDKs' own bundles, on an origin
    that is not the gateway's."""

    def __init__(self, load_options: dict[str, Any]) -> None:
        self.gateway = ""
        self.load_options = load_options
        self.requests: list[str] = []

    def app(self) -> web.Application:
        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.requests.append(f"{request.method} {request.path_qs}")
            return await handler(request)

        async def no_icon(request: web.Request) -> web.Response:
            return web.Response(status=204)

        app = web.Application(middlewares=[record])
        app.router.add_get("/calls.js", self.calls_js)
        app.router.add_get("/favicon.ico", no_icon)
        app.router.add_get("/{page}.html", self.page)
        app.router.add_static("/lib/segment", SEGMENT_DIST)
        app.router.add_static("/lib/customerio", CUSTOMERIO_DIST)
        return app

    async def calls_js(self, request: web.Request) -> web.Response:
        return web.Response(body=(PAGES / "calls.js").read_bytes(), content_type="text/javascript")

    async def page(self, request: web.Request) -> web.Response:
        path = PAGES / f"{request.match_info['page']}.html"
        if not path.is_file():
            raise web.HTTPNotFound()
        html = (path.read_text().replace("{{GATEWAY}}", self.gateway).replace("{{WRITE_KEY}}", WRITE_KEY)
                .replace("{{LOAD_OPTIONS}}", json.dumps(self.load_options)))
        return web.Response(text=html, content_type="text/html")


class FlakyProxy:
    """Between the browser and the gateway. It passes everything on (Host
    included, so the settings document names the proxy), except the first
    POST to ``fail_path``, which it answers 503 itself, as the gateway
    answers when it cannot store: the SDK must retry it, with X-Retry-Count,
    through CORS."""

    HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
                     "upgrade", "te", "trailer", "proxy-connection"})

    def __init__(self, upstream: str, fail_path: str) -> None:
        self.upstream = upstream
        self.fail_path = fail_path
        self.failed = False
        self.seen: list[tuple[str, str, dict[str, str]]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append((request.method, request.path, dict(request.headers)))
        if request.method == "POST" and request.path == self.fail_path and not self.failed:
            self.failed = True
            origin = request.headers.get("Origin")
            return web.json_response({"error": "injected by the test", "reason": "overload"}, status=503,
                                     headers={"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
                                     if origin else None)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self.HOP}
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            async with http.request(request.method, self.upstream + request.path_qs, data=body or None,
                                    headers=headers, allow_redirects=False) as r:
                data = await r.read()
                out = {k: v for k, v in r.headers.items() if k.lower() not in self.HOP}
                return web.Response(status=r.status, body=data, headers=out)


async def drive(url: str, until: Any) -> tuple[dict[str, Any], BaseException | None]:
    """Run drive.mjs on ``url`` until ``until()`` (a coroutine) returns or the
    driver stops by itself; return the driver's report and what ``until``
    raised, if anything."""
    proc = await asyncio.create_subprocess_exec(
        "node", str(BROWSER_DIR / "drive.mjs"),
        json.dumps({"url": url, "chromium": CHROMIUM, "timeoutMs": int(RUN_TIMEOUT * 1000) + 5000}),
        cwd=BROWSER_DIR, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stdin is not None
    output = asyncio.ensure_future(proc.communicate())  # reads both pipes all along
    waiting = asyncio.ensure_future(until())
    problem: BaseException | None = None
    out = err = b""
    try:
        await asyncio.wait({waiting, output}, return_when=asyncio.FIRST_COMPLETED)
        if waiting.done():
            problem = waiting.exception()
        else:
            waiting.cancel()
            problem = RuntimeError("the browser driver stopped before the calls arrived")
        try:
            proc.stdin.write(b"quit\n")
            await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass
        out, err = await asyncio.wait_for(output, 20)
    except asyncio.TimeoutError:
        problem = problem or RuntimeError("the browser driver did not stop within 20 s of 'quit'")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        report = {"error": "the driver printed no report"}
    report["stderr"] = err.decode(errors="replace")[-6000:]
    report["exit"] = proc.returncode
    return report, problem


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text → {(name, sorted labels): value}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or "")))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


@dataclass(frozen=True)
class Scenario:
    page: str
    load_options: dict[str, Any] = field(default_factory=dict)
    #: calls go one per request to the short paths, or together to /v1/b
    batching: bool = False
    #: a FlakyProxy between browser and gateway fails this path once
    fail_once: str | None = None

    @property
    def segment(self) -> bool:
        return self.page.startswith("segment")


SCENARIOS = {
    "segment-npm": Scenario("segment-npm.html"),
    "segment-npm-batching": Scenario("segment-npm.html", {"integrations": {"Segment.io": {
        "deliveryStrategy": {"strategy": "batching", "config": {"size": 6, "timeout": 500}}}}}, batching=True),
    "segment-npm-retry": Scenario("segment-npm.html", fail_once="/v1/t"),
    "segment-snippet": Scenario("segment-snippet.html"),
    "customerio-npm": Scenario("customerio-npm.html"),
    "customerio-snippet": Scenario("customerio-snippet.html"),
}
SHORT_PATHS = {"/v1/i", "/v1/t", "/v1/p", "/v1/s", "/v1/g", "/v1/a"}
ORDER = ["identify", "track", "page", "screen", "group", "alias"]


@pytest.mark.parametrize("name", SCENARIOS)
async def test_real_browser_sdk(name: str, fake_destination: FakeDestination, gateway_process: Any,
                                aiohttp_server: Any) -> None:
    _need_browser()
    sink = fake_destination
    sc = SCENARIOS[name]
    # the site, on its own origin
    site = PageServer(sc.load_options)
    site_server = await aiohttp_server(site.app(), host="127.0.0.1")
    origin = str(site_server.make_url("")).rstrip("/")
    # the gateway, which lets that origin in, by the source's config only
    gw = await gateway_process(server={"cors_origins": []}, destinations=to_sink(sink),
                               sources=[{"name": "web", "write_keys": [WRITE_KEY], "cors_origins": [origin]}])
    api = gw.url
    proxy = None
    if sc.fail_once:
        proxy = FlakyProxy(gw.url, sc.fail_once)
        api = str((await aiohttp_server(proxy.app(), host="127.0.0.1")).make_url("")).rstrip("/")
    site.gateway = api
    assert urlsplit(origin).port != urlsplit(api).port  # another origin
    url = f"{origin}/{sc.page}"

    async def six_calls_at_the_sink() -> None:
        await sink.wait_delivered(len(SIX), timeout=RUN_TIMEOUT)
        await sink.wait_quiet()  # anything more (a retry, a duplicate) would show up too

    for attempt in (1, 2):
        started = time.monotonic()
        report, problem = await drive(url, six_calls_at_the_sink)
        took = time.monotonic() - started
        # Chromium that did not start, or never loaded the page, on a busy
        # machine: that says nothing about the gateway, so once more.
        if attempt == 1 and report.get("userAgent") is None and not sink.requests and not site.requests:
            warnings.warn(f"the browser did not load the page; trying once more: {problem!r} "
                          f"{str(report.get('error'))[:500]}")
            continue
        break

    def why() -> str:
        shown = {k: v for k, v in report.items() if k != "stderr"}
        return (f"\n--- scenario {name}, {took:.1f}s\n--- driver report:\n{json.dumps(shown, indent=1)[:10000]}"
                f"\n--- driver stderr:\n{report.get('stderr', '')}"
                f"\n--- site requests: {site.requests}"
                f"\n--- proxy saw: {[(m, p) for m, p, _ in proxy.seen] if proxy else None}"
                f"\n--- sink got: {json.dumps(sink.delivered(), indent=1)[:4000]}"
                f"\n--- gateway log:\n{gw.log.read_text()[-3000:]}")

    assert problem is None and report.get("error") is None and not report.get("timedOut"), f"{problem!r}{why()}"
    assert took < 60, why()
    calls = sink.delivered()
    assert sorted(c["type"] for c in calls) == sorted(SIX), why()
    assert len({c["messageId"] for c in calls}) == len(calls), why()

    # What the browser did: nothing beyond 127.0.0.1 (no vendor CDN, no
    # device-mode plugin, no metrics), one settings fetch, posts answered 200.
    hosts = {urlsplit(r["url"]).hostname for r in report["requests"]}
    assert hosts <= {"127.0.0.1"}, why()
    to_api = [r for r in report["requests"] if r["url"].startswith(api + "/")]
    settings = [(r["method"], r["url"], r["status"]) for r in to_api if r["url"].endswith("/settings")]
    prefix = "" if sc.segment else "/customerio"
    assert settings == [("GET", f"{api}{prefix}/v1/projects/{WRITE_KEY}/settings", 200)], why()
    posts = [r for r in to_api if r["method"] == "POST"]
    assert all(r["failure"] is None for r in posts), why()
    statuses = [(urlsplit(r["url"]).path, r["status"]) for r in posts]
    if sc.fail_once:
        assert statuses.count((sc.fail_once, 503)) == 1 and statuses.count((sc.fail_once, 200)) == 1, why()
        retried = [r for r in posts if urlsplit(r["url"]).path == sc.fail_once][1]
        assert retried["retryCount"] == "1", why()
        assert any(m == "POST" and p == sc.fail_once and h.get("X-Retry-Count") == "1"
                   for m, p, h in proxy.seen), why()  # type: ignore[union-attr]
        posts = [r for r in posts if r["status"] != 503]
    assert all(st == 200 for path, st in statuses if (path, st) != (sc.fail_once, 503)), why()
    paths = {urlsplit(r["url"]).path for r in posts}
    assert paths == ({"/v1/b"} if sc.batching else SHORT_PATHS), why()

    # The page's own view (npm form): every call delivered, none failed.
    results = report.get("results") or {}
    assert results.get("done") and not results.get("error"), why()
    if "npm" in name:
        assert [r["name"] for r in results["calls"]] == ORDER, why()
        assert all(r["failed"] is None for r in results["calls"]), why()
        assert {r["messageId"] for r in results["calls"]} == {c["messageId"] for c in calls}, why()

    # What the SDK sent, by messageId: text/plain; the key in the body, and
    # from analytics.js >= 1.84 also in Authorization: Basic.
    sent: dict[str, dict[str, Any]] = {}
    for r in posts:
        body = json.loads(r["body"])
        assert r["contentType"].startswith("text/plain"), r
        assert r["authorization"] == (basic(WRITE_KEY) if sc.segment else None), r
        assert body.get("writeKey") == WRITE_KEY, r
        for call in body["batch"] if "batch" in body else [body]:
            sent[call["messageId"]] = call
    assert set(sent) == {c["messageId"] for c in calls}, why()
    if sc.segment:
        assert all("_metadata" in s for s in sent.values()), "analytics.js sent no _metadata to strip"

    # What the destination got: the SDK's context untouched, _metadata and
    # writeKey gone, the gateway's enrichment added.
    by_type = {c["type"]: c for c in calls}
    anonymous = {c.get("anonymousId") for c in calls}
    assert len(anonymous) == 1 and None not in anonymous, why()
    for c in calls:
        assert "_metadata" not in c and "writeKey" not in c, c
        ctx, sent_ctx = c["context"], sent[c["messageId"]]["context"]
        for key in ("page", "userAgent", "library", "locale"):
            assert ctx.get(key) == sent_ctx.get(key), (key, c, sent_ctx)
        assert ctx["userAgent"] == report["userAgent"], c
        lib = ctx["library"]
        assert lib["name"] == "analytics.js" and lib["version"], c
        # Customer.io's SDK gives a screen call no context.page (its page
        # enrichment plugin has no screen handler); every other call has one.
        if sc.segment or c["type"] != "screen":
            page_ctx = ctx.get("page") or pytest.fail(f"no context.page: {json.dumps(c, indent=1)}{why()}")
            assert page_ctx["url"] == url and page_ctx["path"] == f"/{sc.page}" and page_ctx["title"], c
        assert ctx["ip"] == "127.0.0.1", c
        assert c["receivedAt"] and c["timestamp"] and c["originalTimestamp"], c
    assert by_type["identify"]["userId"] == "user-42"
    assert by_type["identify"]["traits"]["email"] == "ada@example.com"
    assert by_type["track"]["event"] == "Order Completed"
    assert by_type["track"]["properties"]["revenue"] == 42.5
    assert by_type["page"]["name"] == "Browser SDKs"
    assert by_type["screen"]["name"] == "Step 2"
    assert by_type["group"]["groupId"] == "org-7"
    assert by_type["group"]["traits"]["name"] == "Acme"
    # the SDK fills previousId with the current userId
    assert by_type["alias"]["userId"] == by_type["alias"]["previousId"] == "user-42"

    # What the gateway counted.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/metrics") as r:
            metrics = scrape(await r.text())
    assert metrics[("gateway_calls_accepted_total", (("source", "web"),))] == len(SIX)
    rejected = {k: v for k, v in metrics.items() if k[0] == "gateway_calls_rejected_total" and v}
    assert not rejected, rejected
    # sampleRate 0: the SDK reported metrics to nobody, the gateway included
    assert metrics[("gateway_sdk_metrics_total", ())] == 0
    preflights = {dict(k[1])["status"]: v for k, v in metrics.items()
                  if k[0] == "gateway_http_requests_total" and dict(k[1])["endpoint"] == "OPTIONS"}
    if sc.segment:
        # Authorization is not a CORS-safelisted header: posts are preflighted
        assert preflights.get("204", 0) >= 1 and set(preflights) == {"204"}, preflights
    else:
        # text/plain and no custom header: no preflight at all
        assert not preflights, preflights


# ---------------------------------------------------------------------------
# README.md's "Browser" section shows the snippets the browser tests run
# ---------------------------------------------------------------------------

README = ROOT / "README.md"


class _Section:
    """README.md's "## Browser" section, read like a file."""

    def read_text(self) -> str:
        text = README.read_text()
        start = text.index("\n## Browser\n")
        end = text.find("\n## ", start + 1)
        return text[start:end if end >= 0 else None]


DOC = _Section()
DOC_GATEWAY = "https://events.example.com"


def _snippet(text: str, global_name: str) -> list[str]:
    """The lines of the snippet that defines ``global_name``, without the
    page() call the documentation adds."""
    start = text.index(f'!function(){{var i="{global_name}"')
    end = text.index("}}();", start) + len("}}();")
    return [ln.strip() for ln in text[start:end].splitlines() if ln.strip() and ln.strip() != "analytics.page();"]


@pytest.mark.parametrize("page,global_name,hosted", [
    ("segment-snippet.html", "analytics", "https://www.example.com/js/analytics-next/standalone.js"),
    ("customerio-snippet.html", "cioanalytics", "https://www.example.com/js/cdp-analytics-browser/standalone.js"),
])
def test_docs_show_the_tested_snippets(page: str, global_name: str, hosted: str) -> None:
    tested = ((PAGES / page).read_text().replace("{{GATEWAY}}", DOC_GATEWAY)
              .replace("{{WRITE_KEY}}", "YOUR_WRITE_KEY").replace(", {{LOAD_OPTIONS}}", "")
              .replace("/lib/segment/standalone.js", hosted).replace("/lib/customerio/standalone.js", hosted))
    assert _snippet(DOC.read_text(), global_name) == _snippet(tested, global_name)


def test_docs_show_the_tested_load_options() -> None:
    doc = DOC.read_text()
    assert f"cdnURL: '{DOC_GATEWAY}'" in doc and f"cdnURL: '{DOC_GATEWAY}/customerio'" in doc
    assert "cdnURL: '{{GATEWAY}}'" in (PAGES / "segment-npm.html").read_text()
    assert "cdnURL: '{{GATEWAY}}/customerio'" in (PAGES / "customerio-npm.html").read_text()
    assert "deliveryStrategy: { strategy: 'batching'" in doc
