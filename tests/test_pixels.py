"""Tracking pixels (issue 12, point 3; docs/pipelines-api.md, "Tracking pixels").

Segment's ``GET /v1/pixel/track|page?data=BASE64`` and RudderStack's
``GET /pixel/v1/track|page?writeKey=WRITE_KEY&...``: always 200 with a 1x1
transparent GIF, in any mode; each problem logged and counted with its
reason; good calls stored through the ingest path like any other (auth,
checks, enrichment, source transforms, spool).

First the pure query → call functions of gateway/pixels.py, then the real
app on a real socket, then one ``gateway serve`` process delivering a pixel's
call to a file destination.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import pytest
from multidict import MultiDict

from gateway.pixels import (
    GIF, UNKNOWN_PAGE, PixelProblem, call_from_data, call_from_fields, decode_base64, rudderstack_call,
    segment_call,
)
from gateway.testing import WRITE_KEY, metrics, sample, spool_calls, wait_until

#: no destination reads the spool, so the purge would remove what it stores: keep it for the test to read
KEEP = {"retention": 3600}
EMAIL_OPENED = {"writeKey": WRITE_KEY, "userId": "user_123", "event": "Email Opened", "messageId": "px-1",
                "properties": {"subject": "The Electric Daily ✓", "email": "jane@example.com", "n": 3,
                               "nested": {"list": [1, "two", None, True]}},
                "context": {"campaign": {"name": "spring"}}, "timestamp": "2024-05-06T07:08:09.123Z"}


def std_b64(doc: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(doc).encode()).decode()


def with_plus_and_slash(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with padding in properties so that its standard base64 holds
    both ``+`` and ``/`` (the characters URL-safe base64 replaces) and needs
    ``=`` padding."""
    for n in range(3):
        # six bytes of each hold an aligned group whatever the offset: "~~~" is "fn5+", "???" is "Pz8/"
        candidate = {**doc, "properties": {**doc.get("properties", {}), "pad": "~~~~~~??????" + "x" * n}}
        encoded = std_b64(candidate)
        if "+" in encoded and "/" in encoded and encoded.endswith("="):
            return candidate
    raise AssertionError("no padding gave both + and /")


# -- the pure part ---------------------------------------------------------------------------

def test_decode_base64_takes_both_alphabets_with_or_without_padding() -> None:
    doc = with_plus_and_slash(EMAIL_OPENED)
    raw = json.dumps(doc).encode()
    std = base64.b64encode(raw).decode()
    urlsafe = base64.urlsafe_b64encode(raw).decode()
    assert std != urlsafe
    for text in (std, std.rstrip("="), urlsafe, urlsafe.rstrip("="), std.replace("+", " "), f"  {std}\n"):
        assert decode_base64(text) == raw, text


@pytest.mark.parametrize("text", ["not base64!", "abcde", "ab=cd", "a"])
def test_decode_base64_refuses_what_is_not_base64(text: str) -> None:
    with pytest.raises(PixelProblem) as e:
        decode_base64(text)
    assert e.value.reason == "encoding" and "base64" in e.value.message


def test_call_from_data() -> None:
    assert call_from_data(std_b64(EMAIL_OPENED)) == EMAIL_OPENED
    assert call_from_data(json.dumps(EMAIL_OPENED)) == EMAIL_OPENED, "JSON without base64 (Segment: optional)"


@pytest.mark.parametrize("data,why", [
    (base64.b64encode(b'["userId", "u1"]').decode(), "JSON object"),
    (base64.b64encode(b'{"userId": ').decode(), "not JSON"),
    (base64.b64encode(b'{"userId": "\xff"}').decode(), "not JSON"),
    (base64.b64encode(b"plain text").decode(), "not JSON"),
])
def test_call_from_data_refuses_what_is_not_a_json_object(data: str, why: str) -> None:
    with pytest.raises(PixelProblem) as e:
        call_from_data(data)
    assert e.value.reason == "json" and why in e.value.message


def test_fields_nest_on_dots_and_the_first_of_repeats_counts() -> None:
    query = MultiDict([("userId", "u1"), ("properties.plan", "pro"), ("context.page.url", "https://x.example/?a=1"),
                       ("context.page.title", "Home"), ("properties.plan", "ignored"), ("event", "Opened")])
    assert call_from_fields(query) == {"userId": "u1", "event": "Opened", "properties": {"plan": "pro"},
                                       "context": {"page": {"url": "https://x.example/?a=1", "title": "Home"}}}


@pytest.mark.parametrize("pairs", [
    [("properties", "x"), ("properties.plan", "pro")],
    [("properties.plan", "pro"), ("properties", "x")],
    [("context.page", "x"), ("context.page.url", "u")],
    [("properties..plan", "pro")],
    [("properties.", "pro")],
])
def test_fields_that_are_both_a_value_and_an_object_are_refused(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(PixelProblem) as e:
        call_from_fields(MultiDict(pairs))
    assert e.value.reason == "bad_field" and pairs[-1][0] in e.value.message


def test_rudderstack_form_as_its_gateway_reads_it() -> None:
    """rudder-server's handle_http_pixel.go: quotes around anonymousId are
    dropped, an empty page name is "Unknown Page"; writeKey stays for ingest."""
    call = rudderstack_call(MultiDict(writeKey=WRITE_KEY, anonymousId='"amp-123"', name=""), "page")
    assert call == {"writeKey": WRITE_KEY, "anonymousId": "amp-123", "name": UNKNOWN_PAGE}
    assert rudderstack_call(MultiDict(anonymousId='"', name=""), "track") == {"anonymousId": '"', "name": ""}
    assert rudderstack_call(MultiDict(anonymousId='a"b"'), "page") == {"anonymousId": 'a"b"'}


def test_segment_form_without_data_reads_the_fields() -> None:
    """Segment documents the unencoded form too: the query's fields."""
    assert segment_call(MultiDict([("writeKey", WRITE_KEY), ("userId", "u1"), ("properties.subject", "Hi")])) == \
        {"writeKey": WRITE_KEY, "userId": "u1", "properties": {"subject": "Hi"}}


def test_the_gif_is_one_transparent_pixel() -> None:
    """Read as a GIF decoder would: 1x1, a colour table, a graphic control
    extension that marks a colour transparent, and one pixel of that colour."""
    assert GIF[:6] == b"GIF89a"
    width, height, flags = struct.unpack("<HHB", GIF[6:11])
    assert (width, height) == (1, 1) and flags & 0x80, "a global colour table"
    table = 3 * 2 ** ((flags & 7) + 1)
    at = 13 + table
    assert GIF[at:at + 3] == b"\x21\xf9\x04", "graphic control extension"
    packed, _, transparent = struct.unpack("<BHB", GIF[at + 3:at + 7])
    assert packed & 1, "transparency on"
    at += 8
    assert GIF[at] == 0x2C and struct.unpack("<HHHH", GIF[at + 1:at + 9]) == (0, 0, 1, 1)
    at += 10
    min_code, size = GIF[at], GIF[at + 1]
    bits = int.from_bytes(GIF[at + 2:at + 2 + size], "little")
    width_bits = min_code + 1
    clear, first = bits & ((1 << width_bits) - 1), (bits >> width_bits) & ((1 << width_bits) - 1)
    assert (clear, first) == (1 << min_code, transparent), "the one pixel is the transparent colour"
    assert GIF[-1:] == b"\x3b"


# -- over HTTP -------------------------------------------------------------------------------

async def get(client: Any, path: str, query: str, headers: dict[str, str] | None = None,
              method: str = "GET") -> None:
    """Fetch a pixel as an <img> would; assert the answer is the GIF."""
    resp = await client.request(method, f"{path}?{query}" if query else path, headers=headers)
    body = await resp.read()
    assert resp.status == 200, body
    assert resp.headers["Content-Type"] == "image/gif"
    assert "no-store" in resp.headers["Cache-Control"]
    assert body == (b"" if method == "HEAD" else GIF)


def rejected(ms: Any) -> dict[str, float]:
    return {dict(labels)["reason"]: v for (name, labels), v in ms.items()
            if name == "gateway_calls_rejected_total" and v}


@pytest.mark.parametrize("encoding", ["std-raw-plus", "std-percent-encoded", "urlsafe-unpadded", "std-unpadded"])
async def test_segment_pixel_stores_the_call(gateway_client: Any, tmp_path: Path, encoding: str) -> None:
    doc = with_plus_and_slash(EMAIL_OPENED)
    raw = json.dumps(doc).encode()
    query = {
        # an e-mail template that pastes btoa() output as is: '+' arrives as a space
        "std-raw-plus": "data=" + base64.b64encode(raw).decode(),
        "std-percent-encoded": urlencode({"data": base64.b64encode(raw).decode()}),
        "urlsafe-unpadded": "data=" + base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "std-unpadded": urlencode({"data": base64.b64encode(raw).decode().rstrip("=")}),
    }[encoding]
    client = await gateway_client(storage=KEEP)
    await get(client, "/v1/pixel/track", query + "&cb=12345")  # a cache buster beside data is ignored
    [call] = spool_calls(tmp_path)
    sent = {k: v for k, v in doc.items() if k != "writeKey"}
    assert {k: call[k] for k in sent if k != "context" and k != "timestamp"} == \
        {k: v for k, v in sent.items() if k not in ("context", "timestamp")}
    assert call["type"] == "track" and "writeKey" not in call and "cb" not in call
    assert call["context"] == {"campaign": {"name": "spring"}, "ip": "127.0.0.1"}
    assert call["originalTimestamp"] == doc["timestamp"] and call["receivedAt"]
    ms = await metrics(client)
    assert sample(ms, "gateway_calls_accepted_total", source="web") == 1
    assert sample(ms, "gateway_http_requests_total", endpoint="/v1/pixel/track", status="200") == 1
    assert rejected(ms) == {}


async def test_segment_page_pixel_and_the_path_decides_the_type(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage=KEEP)
    page = {"writeKey": WRITE_KEY, "anonymousId": "anon-9", "type": "track", "name": "Pricing",
            "properties": {"url": "https://shop.example/pricing"}}
    await get(client, "/v1/pixel/page", urlencode({"data": std_b64(page)}))
    [call] = spool_calls(tmp_path)
    assert (call["type"], call["anonymousId"], call["name"], call["properties"]) == (
        "page", "anon-9", "Pricing", {"url": "https://shop.example/pricing"})


async def test_rudderstack_pixels_store_the_call(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage=KEEP)
    amp = [("writeKey", WRITE_KEY), ("anonymousId", '"amp-xyz"'), ("type", "identify"), ("name", ""),
           ("context.library.name", "Rudderstack AMP SDK"), ("context.page.url", "https://amp.example/a?b=c&d=e"),
           ("context.page.title", "Ünïcode & more"), ("context.screen.width", "1280"), ("properties.plan", "pro")]
    await get(client, "/pixel/v1/page", urlencode(amp))
    await get(client, "/pixel/v1/track", urlencode([("writeKey", WRITE_KEY), ("userId", "u-7"),
                                                    ("event", "Email Opened"), ("properties.subject", "Hi"),
                                                    ("messageId", "rs-1")]))
    page, track = spool_calls(tmp_path)
    assert page["type"] == "page", "the path decides, not a type parameter"
    assert page["anonymousId"] == "amp-xyz" and page["name"] == UNKNOWN_PAGE
    assert page["context"] == {"library": {"name": "Rudderstack AMP SDK"}, "ip": "127.0.0.1",
                               "page": {"url": "https://amp.example/a?b=c&d=e", "title": "Ünïcode & more"},
                               "screen": {"width": "1280"}}, "values stay strings"
    assert page["properties"] == {"plan": "pro"} and "writeKey" not in page
    assert (track["type"], track["userId"], track["event"], track["messageId"], track["properties"]) == (
        "track", "u-7", "Email Opened", "rs-1", {"subject": "Hi"})
    ms = await metrics(client)
    assert sample(ms, "gateway_calls_accepted_total", source="web") == 2
    assert sample(ms, "gateway_http_requests_total", endpoint="/pixel/v1/page", status="200") == 1
    assert sample(ms, "gateway_http_requests_total", endpoint="/pixel/v1/track", status="200") == 1


async def test_pixels_take_the_ingest_path(gateway_client: Any, tmp_path: Path) -> None:
    """Source transforms, the trusted proxy's X-Forwarded-For, and a write key
    from the pixel only (an Authorization header does not count)."""
    client = await gateway_client(server={"trusted_proxies": ["127.0.0.1"]}, storage=KEEP,
                                  transforms=[{"type": "drop_fields", "settings": {"paths": ["properties.email"]}}])
    await get(client, "/v1/pixel/track", urlencode({"data": std_b64(EMAIL_OPENED)}),
              headers={"X-Forwarded-For": "203.0.113.9", "Authorization": "Bearer not-a-key"})
    [call] = spool_calls(tmp_path)
    assert "email" not in call["properties"] and call["properties"]["subject"] == "The Electric Daily ✓"
    assert call["context"]["ip"] == "203.0.113.9"


#: name → (path, query, the reason counted)
PROBLEMS: dict[str, tuple[str, str, str]] = {
    "no-data-no-fields": ("/v1/pixel/track", "", "auth"),
    "not-base64": ("/v1/pixel/track", "data=%25%25%25", "encoding"),
    "not-json": ("/v1/pixel/track", urlencode({"data": base64.b64encode(b"hello").decode()}), "json"),
    "json-array": ("/v1/pixel/track", urlencode({"data": base64.b64encode(b"[1]").decode()}), "json"),
    "wrong-key": ("/v1/pixel/track", urlencode({"data": std_b64({**EMAIL_OPENED, "writeKey": "nope"})}), "auth"),
    "no-key": ("/v1/pixel/page", urlencode({"data": std_b64({"userId": "u1"})}), "auth"),
    "no-user": ("/v1/pixel/track", urlencode({"data": std_b64({"writeKey": WRITE_KEY, "event": "E"})}),
                "missing_field"),
    "no-event": ("/v1/pixel/track", urlencode({"data": std_b64({"writeKey": WRITE_KEY, "userId": "u"})}),
                 "missing_field"),
    "bad-timestamp": ("/v1/pixel/page", urlencode({"data": std_b64({"writeKey": WRITE_KEY, "userId": "u",
                                                                    "timestamp": "yesterday"})}), "bad_field"),
    "bad-properties": ("/v1/pixel/track", urlencode({"data": std_b64({**EMAIL_OPENED, "properties": [1]})}),
                       "bad_field"),
    "too-large": ("/v1/pixel/track", urlencode({"data": std_b64({**EMAIL_OPENED, "properties": {"x": "y" * 1500}})}),
                  "size"),
    "rs-no-key": ("/pixel/v1/track", urlencode({"userId": "u", "event": "E"}), "auth"),
    "rs-wrong-key": ("/pixel/v1/track", urlencode({"writeKey": "nope", "userId": "u", "event": "E"}), "auth"),
    "rs-empty-event": ("/pixel/v1/track", urlencode({"writeKey": WRITE_KEY, "userId": "u", "event": ""}),
                       "missing_field"),
    "rs-no-user": ("/pixel/v1/page", urlencode({"writeKey": WRITE_KEY, "name": "Home"}), "missing_field"),
    "rs-conflict": ("/pixel/v1/track", urlencode([("writeKey", WRITE_KEY), ("userId", "u"), ("event", "E"),
                                                  ("properties", "x"), ("properties.plan", "pro")]), "bad_field"),
}


@pytest.mark.parametrize("mode", ["lax", "server-strict", "header-strict"])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
async def test_every_problem_is_the_gif_logged_and_counted(gateway_client: Any, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture,
                                                           name: str, mode: str) -> None:
    path, query, reason = PROBLEMS[name]
    client = await gateway_client(server={"max_event_bytes": "1KiB", "strict": mode == "server-strict"},
                                  storage=KEEP)
    caplog.set_level(logging.INFO, logger="gateway")
    await get(client, path, query, headers={"X-Strict-Mode": "1"} if mode == "header-strict" else None)
    assert spool_calls(tmp_path) == []
    ms = await metrics(client)
    assert rejected(ms) == {reason: 1}
    assert sample(ms, "gateway_http_requests_total", endpoint=path, status="200") == 1
    assert not sample(ms, "gateway_calls_accepted_total", source="web")
    logged = [r.getMessage() for r in caplog.records if r.name == "gateway" and "rejected pixel" in r.getMessage()]
    assert len(logged) == 1 and path in logged[0], logged
    # and the next good pixel is stored: nothing else was lost
    await get(client, "/v1/pixel/track", urlencode({"data": std_b64(EMAIL_OPENED)}))
    assert [c["messageId"] for c in spool_calls(tmp_path)] == ["px-1"]


async def test_a_pixel_that_cannot_be_stored_is_the_gif_and_counted_as_overload(
        gateway_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """docs/pipelines-api.md: pixels are always 200 with the GIF, so a full spool cannot
    answer 503 here; the call is counted as an overload rejection and logged."""
    client = await gateway_client(storage={"max_bytes": 10, **KEEP})
    caplog.set_level(logging.WARNING, logger="gateway")
    await get(client, "/v1/pixel/track", urlencode({"data": std_b64(EMAIL_OPENED)}))
    await get(client, "/pixel/v1/page", urlencode({"writeKey": WRITE_KEY, "userId": "u"}))
    assert spool_calls(tmp_path) == []
    assert rejected(await metrics(client)) == {"overload": 2}
    assert sum("not stored" in r.getMessage() for r in caplog.records) == 2


async def test_head_is_the_gif_and_stores_nothing(gateway_client: Any, tmp_path: Path) -> None:
    """Mail scanners and link checkers send HEAD: it must not count as an open."""
    client = await gateway_client(storage=KEEP)
    await get(client, "/v1/pixel/track", urlencode({"data": std_b64(EMAIL_OPENED)}), method="HEAD")
    await get(client, "/pixel/v1/track", urlencode({"writeKey": WRITE_KEY, "userId": "u", "event": "E"}),
              method="HEAD")
    assert spool_calls(tmp_path) == []
    assert rejected(await metrics(client)) == {}


async def test_a_bug_on_the_pixel_path_is_still_the_gif(gateway_client: Any) -> None:
    from gateway import app_state

    client = await gateway_client()

    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("injected by the test")

    client.app[app_state.INGEST].prepare = broken
    await get(client, "/v1/pixel/track", urlencode({"data": std_b64(EMAIL_OPENED)}))
    assert rejected(await metrics(client)) == {"internal": 1}


async def test_only_track_and_page(gateway_client: Any) -> None:
    client = await gateway_client()
    for path in ("/v1/pixel/identify", "/pixel/v1/identify"):
        assert (await client.get(path)).status == 404


# -- a live gateway, to a destination -----------------------------------------------------------

async def test_a_pixel_reaches_a_file_destination(gateway_process: Any, tmp_path: Path) -> None:
    """``gateway serve``; the <img> URLs an e-mail would carry; the file
    destination gets each call once, as stored."""
    out = tmp_path / "events.jsonl"
    gw_proc = await gateway_process(textwrap.dedent(f"""
        destinations:
          - name: Archive
            type: file
            settings: {{path: "{out}"}}
            batch: {{max_wait: 0.01}}
        """))
    segment_url = f"{gw_proc.url}/v1/pixel/track?data={quote(std_b64({**EMAIL_OPENED, 'writeKey': WRITE_KEY}))}"
    rudder_url = f"{gw_proc.url}/pixel/v1/page?" + urlencode(
        {"writeKey": WRITE_KEY, "anonymousId": "a-1", "name": "Home", "context.page.path": "/"})
    async with aiohttp.ClientSession() as http:
        for url in (segment_url, rudder_url):
            async with http.get(url) as r:
                assert (r.status, r.headers["Content-Type"], await r.read()) == (200, "image/gif", GIF)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []

    await wait_until(lambda: len(lines()) >= 2, what="both calls in the file destination", timeout=15,
                     seen=lambda: f"file has {lines()}\n{gw_proc.log_tail(2000)}")
    track, page = sorted(lines(), key=lambda c: c["type"], reverse=True)
    assert (track["type"], track["event"], track["messageId"], track["properties"]) == (
        "track", "Email Opened", "px-1", EMAIL_OPENED["properties"])
    assert (page["type"], page["anonymousId"], page["name"], page["context"]["page"]) == (
        "page", "a-1", "Home", {"path": "/"})
