"""Ingestion over HTTP against the real app on a real socket (issue 2).

The specification is Customer.io's Pipelines API: the strict/lax table in
docs/pipelines-api.md ("The Pipelines API has lax and strict
modes", "Required fields by request type", "Maximum request sizes") and
docs/pipelines-api.md ("Authentication & rate limits", "Batch
requests"); README.md ("HTTP API") adds what is ours: Bearer and body write
keys, text/plain, the browser short paths, 503 on overload, CORS, metrics.

"Not stored" is checked on the spool file itself (``events`` table), and a
good call sent afterwards proves the spool was working all along.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import zlib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.spool.sqlite import SqliteSpool
from gateway.testing import (
    AUTH_HEADERS, STRICT_HEADERS, WRITE_KEY, FakeDestination, metrics, post, sample, spool_calls, spool_path,
    spool_query, track,
)

MAX_EVENT = 1024
MAX_BATCH = 4096
LIMITS = {"max_event_bytes": "1KiB", "max_batch_bytes": "4KiB"}
GOOD = {"userId": "u1", "event": "Clicked", "messageId": "good-1"}
#: no destination reads the spool, so all it stores counts as delivered, and
#: the purge (every 2 s) would remove it: keep it for the test to read
KEEP = {"retention": 3600}
#: a second source, for the tests of which key a call is stored under
OTHER_KEY = "other-write-key"
WEB_AND_APP = [{"name": "web", "write_keys": [WRITE_KEY]}, {"name": "app", "write_keys": [OTHER_KEY]}]


def padded(call: dict[str, Any], size: int) -> bytes:
    """``call`` as JSON of exactly ``size`` bytes (padding in properties.pad)."""
    call = {**call, "properties": {**call.get("properties", {}), "pad": ""}}
    base = len(msgspec.json.encode(call))
    assert base <= size, (base, size)
    call["properties"]["pad"] = "x" * (size - base)
    data = msgspec.json.encode(call)
    assert len(data) == size
    return data


def spool_rows(tmp_path: Path) -> list[tuple[str, int, bytes]]:
    """(source, count, data) of each row of the spool's ``events`` table."""
    return spool_query(tmp_path, "SELECT source, count, data FROM events ORDER BY seq")  # type: ignore[return-value]


def raw_deflate(data: bytes) -> bytes:
    co = zlib.compressobj(wbits=-15)
    return co.compress(data) + co.flush()


# -- the strict/lax table, every row in both modes --------------------------------

#: name → (path, body, extra headers, send the good key?, strict status, reason, field, limit)
TABLE: dict[str, tuple[str, bytes, dict[str, str], bool, int, str, str | None, int | None]] = {
    "auth-wrong-bearer": ("/v1/track", msgspec.json.encode(GOOD), {"Authorization": "Bearer nope"}, False,
                          401, "auth", "Authorization", None),
    "auth-wrong-basic": ("/v1/track", msgspec.json.encode(GOOD),
                         {"Authorization": "Basic " + base64.b64encode(b"nope:").decode()}, False,
                         401, "auth", "Authorization", None),
    "auth-no-key": ("/v1/track", msgspec.json.encode(GOOD), {}, False, 401, "auth", "writeKey", None),
    "auth-wrong-body-key": ("/v1/track", msgspec.json.encode({**GOOD, "writeKey": "nope"}), {}, False,
                            401, "auth", "writeKey", None),
    "encoding-invalid-gzip": ("/v1/track", b"this is not gzip", {"Content-Encoding": "gzip"}, True,
                              400, "encoding", "Content-Encoding", None),
    "encoding-invalid-deflate": ("/v1/track", b"this is not deflate", {"Content-Encoding": "deflate"}, True,
                                 400, "encoding", "Content-Encoding", None),
    "encoding-corrupt-gzip-crc": ("/v1/track",
                                  (lambda g: g[:-8] + bytes([g[-8] ^ 0xFF]) + g[-7:])(
                                      gzip.compress(msgspec.json.encode(GOOD))),
                                  {"Content-Encoding": "gzip"}, True, 400, "encoding", "Content-Encoding", None),
    "encoding-unsupported": ("/v1/track", msgspec.json.encode(GOOD), {"Content-Encoding": "compress"}, True,
                             400, "encoding", "Content-Encoding", None),
    "size-single-call": ("/v1/track", padded(GOOD, MAX_EVENT + 1), {}, True, 400, "size", "body", MAX_EVENT),
    "size-single-call-gzip": ("/v1/track", gzip.compress(padded(GOOD, MAX_EVENT + 1)),
                              {"Content-Encoding": "gzip"}, True, 400, "size", "body", MAX_EVENT),
    "size-batch": ("/v1/batch", msgspec.json.encode({"batch": [track(f"m-{i}") for i in range(100)]}), {}, True,
                   400, "size", "body", MAX_BATCH),
    "json-malformed": ("/v1/track", b'{"userId": "u1", "event": ', {}, True, 400, "json", None, None),
    "json-not-an-object": ("/v1/track", b'["userId", "u1"]', {}, True, 400, "json", None, None),
    "json-batch-not-a-list": ("/v1/batch", b'{"batch": {"type": "track"}}', {}, True, 400, "json", "batch", None),
    "json-batch-missing": ("/v1/batch", b'{"calls": []}', {}, True, 400, "json", None, None),
    "json-not-utf8": ("/v1/track", b'{"userId": "\xff\xfe", "event": "x"}', {}, True, 400, "json", None, None),
    "json-not-utf8-batch": ("/v1/batch", b'{"batch": [{"type": "track", "userId": "\xff", "event": "x"}]}', {},
                            True, 400, "json", None, None),
    "missing-user": ("/v1/track", b'{"event": "Clicked"}', {}, True, 400, "missing_field", "userId", None),
    "missing-event": ("/v1/track", b'{"userId": "u1"}', {}, True, 400, "missing_field", "event", None),
    "missing-group-id": ("/v1/group", b'{"userId": "u1"}', {}, True, 400, "missing_field", "groupId", None),
    "missing-previous-id": ("/v1/alias", b'{"userId": "u1"}', {}, True, 400, "missing_field", "previousId", None),
}




@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lax"])
@pytest.mark.parametrize("row", sorted(TABLE))
async def test_strict_lax_table(gateway_client: Any, tmp_path: Path, row: str, strict: bool) -> None:
    """docs/pipelines-api.md, "Pipelines validation modes": with
    X-Strict-Mode: 1 each error is a 401/400 with details naming the field
    (and the limit); without it the answer is 200 and nothing is stored."""
    path, data, headers, with_key, status, reason, field, limit = TABLE[row]
    client = await gateway_client(server=LIMITS, storage=KEEP)
    got, doc, resp = await post(client, path, data, strict=strict, auth=with_key, headers=headers)
    assert resp.content_type == "application/json"
    if strict:
        assert got == status, doc
        assert doc["reason"] == reason
        assert isinstance(doc["error"], str) and doc["error"]
        assert doc.get("field") == field
        assert doc.get("limit") == limit
        if limit is not None:
            assert str(limit) in doc["error"]
    else:
        assert (got, doc) == (200, {})
    assert spool_calls(tmp_path) == []
    ms = await metrics(client)
    assert sample(ms, "gateway_calls_rejected_total", reason=reason) == 1
    assert sample(ms, "gateway_http_requests_total", endpoint=path, status=str(got)) == 1
    assert not sample(ms, "gateway_calls_accepted_total", source="web")
    # The spool works: the next good call is stored, alone.
    assert (await post(client, "/v1/track", GOOD))[:2] == (200, {})
    assert [c["messageId"] for c in spool_calls(tmp_path)] == ["good-1"]


async def test_strict_mode_only_for_the_value_1(gateway_client: Any, tmp_path: Path) -> None:
    """docs/pipelines-api.md, X-Strict-Mode: "When not set or set to
    any other value, the API operates in permissive mode"."""
    client = await gateway_client(storage=KEEP)
    assert (await post(client, "/v1/track", {"userId": "u1"}, headers={"X-Strict-Mode": "0"}))[:2] == (200, {})
    assert (await post(client, "/v1/track", {"userId": "u1"}, headers={"X-Strict-Mode": " 1 "}))[0] == 400
    assert spool_calls(tmp_path) == []


async def test_strict_mode_true_is_permissive_per_seed(gateway_client: Any) -> None:
    """docs/pipelines-api.md, X-Strict-Mode header (enum: 1)."""
    client = await gateway_client(storage=KEEP)
    assert (await post(client, "/v1/track", {"userId": "u1"}, headers={"X-Strict-Mode": "true"}))[:2] == (200, {})


async def test_source_configured_strict_without_header(gateway_client: Any, tmp_path: Path) -> None:
    """README.md: lax is "the default per source"; ``strict: true`` makes every
    request of that source strict (docs/pipelines-api.md table)."""
    client = await gateway_client(storage=KEEP, sources=[{"name": "web", "write_keys": [WRITE_KEY], "strict": True}])
    got, doc, _ = await post(client, "/v1/track", {"userId": "u1"})
    assert (got, doc["reason"], doc["field"]) == (400, "missing_field", "event")
    got, doc, _ = await post(client, "/v1/batch", {"batch": [track("m-1"), {"type": "group", "userId": "u1"}]})
    assert got == 400 and [(e["index"], e["field"]) for e in doc["errors"]] == [(1, "batch[1].groupId")]
    assert [c["messageId"] for c in spool_calls(tmp_path)] == ["m-1"]


@pytest.mark.parametrize("data,headers,reason", [
    (b"{not json", {}, "json"),
    (b"x" * 2000, {}, "size"),
    (b"not gzip", {"Content-Encoding": "gzip"}, "encoding"),
], ids=["json", "size", "encoding"])
async def test_strict_source_rejects_whole_request_errors(gateway_client: Any, data: bytes, headers: dict[str, str],
                                                          reason: str) -> None:
    """docs/pipelines-api.md table, for a source with ``strict: true``."""
    client = await gateway_client(server=LIMITS, storage=KEEP,
                                  sources=[{"name": "web", "write_keys": [WRITE_KEY], "strict": True}])
    got, doc, _ = await post(client, "/v1/track", data, headers=headers)
    assert got == 400 and doc["reason"] == reason


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lax"])
@pytest.mark.parametrize("path", ["/v1/track", "/v1/batch"])
async def test_deeply_nested_json_is_a_json_error(gateway_client: Any, tmp_path: Path, path: str, strict: bool) -> None:
    """docs/pipelines-api.md: JSON validation failures are 400 in
    strict mode, 200 in lax mode; never a 500."""
    client = await gateway_client(storage=KEEP)
    nested = b'{"userId": "u1", "event": "x", "type": "track", "properties": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    data = nested if path == "/v1/track" else b'{"batch": [' + nested + b"]}"
    got, doc, _ = await post(client, path, data, strict=strict)
    if strict:
        assert got == 400 and doc["reason"] == "json", doc
    else:
        assert (got, doc) == (200, {})
    assert spool_calls(tmp_path) == []


@pytest.mark.xfail(reason="known limitation: Content-Encoding br/zstd is refused by aiohttp's parser "
                          "(plain-text 400) before the gateway sees the request, in both modes; no SDK sends "
                          "them", strict=True)
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lax"])
async def test_unsupported_encoding_br_follows_the_table(gateway_client: Any, tmp_path: Path, strict: bool) -> None:
    """docs/pipelines-api.md: content encoding errors are 400 in
    strict mode, 200 in lax mode."""
    client = await gateway_client(storage=KEEP)
    got, doc, _ = await post(client, "/v1/track", GOOD, strict=strict, headers={"Content-Encoding": "br"})
    if strict:
        assert got == 400 and isinstance(doc, dict), doc
        assert (doc["reason"], doc["field"]) == ("encoding", "Content-Encoding")
    else:
        assert (got, doc) == (200, {})
    assert spool_calls(tmp_path) == []


# -- required fields by type --------------------------------------------------------

PERSON_TYPES = ["identify", "track", "page", "screen", "alias"]
EXTRA = {"identify": {}, "track": {"event": "Clicked"}, "page": {"name": "Home"}, "screen": {"name": "Main"},
         "alias": {"previousId": "old-id"}, "group": {"groupId": "g1"}}


@pytest.mark.parametrize("type_", PERSON_TYPES)
async def test_person_types_need_user_or_anonymous_id(gateway_client: Any, tmp_path: Path, type_: str) -> None:
    """docs/pipelines-api.md, "Required fields by request type":
    Identify, Track, Page, Screen and Alias need userId or anonymousId."""
    client = await gateway_client(storage=KEEP)
    got, doc, _ = await post(client, f"/v1/{type_}", {**EXTRA[type_], "messageId": "none"}, strict=True)
    assert (got, doc["reason"], doc["field"]) == (400, "missing_field", "userId")
    assert "userId or anonymousId" in doc["error"]
    got, doc, _ = await post(client, f"/v1/{type_}", {**EXTRA[type_], "userId": "", "messageId": "empty"},
                             strict=True)
    assert (got, doc["field"]) == (400, "userId"), "an empty userId is no identifier"
    assert (await post(client, f"/v1/{type_}", {**EXTRA[type_], "userId": "u1", "messageId": "by-user"},
                       strict=True))[:2] == (200, {})
    assert (await post(client, f"/v1/{type_}", {**EXTRA[type_], "anonymousId": "a1", "messageId": "by-anon"},
                       strict=True))[:2] == (200, {})
    got_calls = spool_calls(tmp_path)
    assert [(c["type"], c["messageId"]) for c in got_calls] == [(type_, "by-user"), (type_, "by-anon")]


async def test_track_needs_an_event_name(gateway_client: Any, tmp_path: Path) -> None:
    """docs/pipelines-api.md: "Track calls require an event name"."""
    client = await gateway_client(storage=KEEP)
    for event in (None, "", 5):
        call = {"userId": "u1"} if event is None else {"userId": "u1", "event": event}
        got, doc, _ = await post(client, "/v1/track", call, strict=True)
        assert (got, doc["field"]) == (400, "event"), event
    assert spool_calls(tmp_path) == []


async def test_group_needs_group_id_only(gateway_client: Any, tmp_path: Path) -> None:
    """docs/pipelines-api.md: "Group calls require a groupId" (and
    nothing else of the person list)."""
    client = await gateway_client(storage=KEEP)
    got, doc, _ = await post(client, "/v1/group", {"userId": "u1", "groupId": ""}, strict=True)
    assert (got, doc["field"]) == (400, "groupId")
    assert (await post(client, "/v1/group", {"groupId": "g1", "messageId": "g"}, strict=True))[:2] == (200, {})
    assert [(c["type"], c["groupId"]) for c in spool_calls(tmp_path)] == [("group", "g1")]


async def test_alias_needs_previous_id_and_may_equal_user_id(gateway_client: Any, tmp_path: Path) -> None:
    """docs/pipelines-api.md: "Alias calls require a previousId";
    docs/pipelines-api.md, "Merge profiles": previousId and userId.
    An alias whose userId equals its previousId is still a valid call."""
    client = await gateway_client(storage=KEEP)
    got, doc, _ = await post(client, "/v1/alias", {"userId": "u1"}, strict=True)
    assert (got, doc["field"]) == (400, "previousId")
    assert (await post(client, "/v1/alias", {"userId": "u1", "previousId": "u1", "messageId": "same"},
                       strict=True))[:2] == (200, {})
    assert [(c["userId"], c["previousId"]) for c in spool_calls(tmp_path)] == [("u1", "u1")]


async def test_required_fields_inside_a_batch(gateway_client: Any, tmp_path: Path) -> None:
    """The same rules apply to every call of a batch, and a batch call needs a
    type (docs/pipelines-api.md, "Batch requests")."""
    client = await gateway_client(storage=KEEP)
    batch = [
        {"type": "identify", "userId": "u1", "messageId": "ok-0"},
        {"type": "identify", "messageId": "bad-1"},
        {"type": "track", "anonymousId": "a1", "messageId": "bad-2"},
        {"type": "page", "anonymousId": "a1", "messageId": "ok-3"},
        {"type": "screen", "messageId": "bad-4"},
        {"type": "group", "userId": "u1", "messageId": "bad-5"},
        {"type": "alias", "userId": "u1", "messageId": "bad-6"},
        {"userId": "u1", "event": "x", "messageId": "bad-7"},
        {"type": "purchase", "userId": "u1", "messageId": "bad-8"},
        "not an object",
        {"type": "alias", "userId": "u1", "previousId": "u0", "messageId": "ok-10"},
    ]
    got, doc, _ = await post(client, "/v1/batch", {"batch": batch}, strict=True)
    assert got == 400
    assert doc["accepted"] == 3
    assert [(e["index"], e["field"], e["reason"]) for e in doc["errors"]] == [
        (1, "batch[1].userId", "missing_field"),
        (2, "batch[2].event", "missing_field"),
        (4, "batch[4].userId", "missing_field"),
        (5, "batch[5].groupId", "missing_field"),
        (6, "batch[6].previousId", "missing_field"),
        (7, "batch[7].type", "missing_field"),
        (8, "batch[8].type", "bad_type"),
        (9, "batch[9]", "json"),
    ]
    assert all(isinstance(e["message"], str) and e["message"] for e in doc["errors"])
    assert [c["messageId"] for c in spool_calls(tmp_path)] == ["ok-0", "ok-3", "ok-10"]


async def test_a_batch_call_whose_type_is_not_a_string_costs_only_itself(gateway_client: Any, tmp_path: Path) -> None:
    """``type`` of any JSON shape is that call's bad_type, with a message of
    bounded size; the calls around it are stored (a list or an object once
    made the whole request a 500)."""
    client = await gateway_client(storage=KEEP)
    shapes: list[Any] = [[], ["track"], {"a": 1}, 7, True, "", list(range(5000))]

    def batch(run: str) -> list[dict[str, Any]]:
        return ([{"type": "track", "userId": "u1", "event": "e", "messageId": f"{run}-ok-first"}]
                + [{"type": t, "userId": "u1", "event": "e", "messageId": f"{run}-bad-{i}"}
                   for i, t in enumerate(shapes)]
                + [{"type": "track", "userId": "u1", "event": "e", "messageId": f"{run}-ok-last"}])
    got, doc, _ = await post(client, "/v1/batch", {"batch": batch("strict")}, strict=True)
    assert got == 400, doc
    assert doc["accepted"] == 2
    assert [(e["index"], e["field"], e["reason"]) for e in doc["errors"]] == [
        (i + 1, f"batch[{i + 1}].type", "bad_type") for i in range(len(shapes))]
    assert all(e["message"].startswith("type must be one of alias, group, identify, page, screen, track")
               and len(e["message"]) < 200 for e in doc["errors"]), [e["message"] for e in doc["errors"]]
    assert [c["messageId"] for c in spool_calls(tmp_path)] == ["strict-ok-first", "strict-ok-last"]
    got, doc, _ = await post(client, "/v1/batch", {"batch": batch("lax")})  # lax: 200, the good calls stored
    assert (got, doc) == (200, {})
    assert [c["messageId"] for c in spool_calls(tmp_path)][2:] == ["lax-ok-first", "lax-ok-last"]


# -- partial batches ---------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/batch", "/v1/import", "/v1/b"])
async def test_lax_partial_batch_keeps_good_calls(gateway_client: Any, tmp_path: Path, path: str) -> None:
    """README.md: "A batch keeps its good events"; lax answers 200 {}
    (docs/pipelines-api.md table)."""
    client = await gateway_client(storage=KEEP)
    batch = [track("m-0"), {"type": "track", "userId": "u1", "messageId": "bad"}, track("m-2")]
    assert (await post(client, path, {"batch": batch}))[:2] == (200, {})
    assert [c["messageId"] for c in spool_calls(tmp_path)] == ["m-0", "m-2"]
    ms = await metrics(client)
    assert sample(ms, "gateway_calls_accepted_total", source="web") == 2
    assert sample(ms, "gateway_calls_rejected_total", reason="missing_field") == 1


async def test_lax_rejections_never_reach_a_destination(gateway_client: Any, fake_destination: FakeDestination,
                                                        tmp_path: Path) -> None:
    """What a webhook destination receives after a mix of good and bad lax
    requests is exactly the good calls (docs/pipelines-api.md: lax
    mode logs the error, answers 200 and the request "will not go through")."""
    client = await gateway_client(server=LIMITS, storage=KEEP, destinations=[
        {"name": "Hook", "type": "webhook", "settings": {"url": fake_destination.url}, "batch": {"max_wait": 0.01}}])
    for data, headers, auth in (
        (msgspec.json.encode(track("m-ok-1")), {}, True),
        (msgspec.json.encode(track("m-bad-key")), {"Authorization": "Bearer nope"}, False),
        (b"garbage", {"Content-Encoding": "gzip"}, True),
        (padded(track("m-too-big"), MAX_EVENT + 1), {}, True),
        (b"{", {}, True),
        (msgspec.json.encode({"userId": "u1", "messageId": "no-event"}), {}, True),
        (msgspec.json.encode({"batch": [track("m-ok-2"), {"type": "alias", "userId": "u1", "messageId": "no-prev"},
                                        msgspec.json.decode(padded(track("m-big-in-batch"), MAX_EVENT + 10))]}),
         {}, True),
    ):
        path = "/v1/batch" if data.startswith(b'{"batch"') else "/v1/track"
        assert (await post(client, path, data, auth=auth, headers=headers))[:2] == (200, {})
    await fake_destination.wait_delivered(2)
    await fake_destination.wait_quiet()  # anything else stored would be delivered within it
    assert [c["messageId"] for c in fake_destination.delivered()] == ["m-ok-1", "m-ok-2"]


async def test_strict_partial_batch_lists_rejections_and_stores_the_rest(gateway_client: Any, tmp_path: Path) -> None:
    """Our documented strict answer for a partial batch: 400 naming each
    rejected call's index and field, while the good calls ARE stored."""
    client = await gateway_client(storage=KEEP)
    batch = [track("m-0"), {"type": "group", "userId": "u1"}, track("m-2"), {"type": "track", "event": "x"}]
    got, doc, _ = await post(client, "/v1/batch", {"batch": batch}, strict=True)
    assert got == 400
    assert doc["accepted"] == 2
    assert "2 call(s)" in doc["error"]
    assert [{k: e[k] for k in ("index", "field", "reason")} for e in doc["errors"]] == [
        {"index": 1, "field": "batch[1].groupId", "reason": "missing_field"},
        {"index": 3, "field": "batch[3].userId", "reason": "missing_field"},
    ]
    assert [c["messageId"] for c in spool_calls(tmp_path)] == ["m-0", "m-2"]


async def test_batch_where_every_call_is_bad_stores_nothing(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage=KEEP)
    got, doc, _ = await post(client, "/v1/batch", {"batch": [{"type": "track"}]}, strict=True)
    assert (got, doc["accepted"]) == (400, 0)
    assert (await post(client, "/v1/batch", {"batch": []}))[:2] == (200, {})
    assert spool_calls(tmp_path) == [] and spool_rows(tmp_path) == []


# -- write keys --------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["basic", "basic-no-colon", "bearer", "body", "body-batch", "bearer-lowercase"])
async def test_each_way_of_passing_the_write_key(gateway_client: Any, tmp_path: Path, how: str) -> None:
    """docs/pipelines-api.md, "Authentication": the key is the
    Basic username with a blank password; README.md adds Bearer and writeKey
    in the body (browser SDKs).  writeKey is never stored."""
    client = await gateway_client(storage=KEEP, sources=WEB_AND_APP)
    headers: dict[str, str] = {}
    call: dict[str, Any] = dict(GOOD)
    path, payload = "/v1/track", call
    if how == "basic":
        headers["Authorization"] = "Basic " + base64.b64encode(f"{OTHER_KEY}:".encode()).decode()
    elif how == "basic-no-colon":
        headers["Authorization"] = "Basic " + base64.b64encode(OTHER_KEY.encode()).decode()
    elif how == "bearer":
        headers["Authorization"] = f"Bearer {OTHER_KEY}"
    elif how == "bearer-lowercase":
        headers["Authorization"] = f"bearer {OTHER_KEY}"
    elif how == "body":
        call["writeKey"] = OTHER_KEY
    else:
        path, payload = "/v1/batch", {"batch": [{**call, "type": "track", "writeKey": OTHER_KEY}],
                                      "writeKey": OTHER_KEY}
    got, doc, _ = await post(client, path, payload, auth=False, strict=True, headers=headers)
    assert (got, doc) == (200, {})
    rows = spool_rows(tmp_path)
    assert [(r[0], r[1]) for r in rows] == [("app", 1)], "stored under the source the key belongs to"
    assert b"writeKey" not in rows[0][2] and OTHER_KEY.encode() not in rows[0][2]
    [stored_call] = spool_calls(tmp_path)
    assert stored_call["messageId"] == "good-1" and "writeKey" not in stored_call


async def test_bad_key_in_header_wins_over_good_key_in_body(gateway_client: Any, tmp_path: Path) -> None:
    """A wrong Authorization header is an authentication error even when the
    body carries a valid writeKey (docs/pipelines-api.md: 401)."""
    client = await gateway_client(storage=KEEP)
    got, doc, _ = await post(client, "/v1/track", {**GOOD, "writeKey": WRITE_KEY}, auth=False, strict=True,
                             headers={"Authorization": "Bearer wrong-key"})
    assert (got, doc["reason"], doc["field"]) == (401, "auth", "Authorization")
    # An Authorization header that is not Basic/Bearer is no key: the body's is used.
    got, doc, _ = await post(client, "/v1/track", {**GOOD, "writeKey": WRITE_KEY}, auth=False, strict=True,
                             headers={"Authorization": "Digest abc"})
    assert (got, doc) == (200, {})
    # A good header key with a wrong body key: the header decides, the body key is dropped.
    got, doc, _ = await post(client, "/v1/track", {**GOOD, "messageId": "g2", "writeKey": "wrong"}, strict=True)
    assert (got, doc) == (200, {})
    assert [(c["messageId"], "writeKey" in c) for c in spool_calls(tmp_path)] == [("good-1", False), ("g2", False)]
    assert [r[0] for r in spool_rows(tmp_path)] == ["web", "web"]


async def test_write_key_must_be_a_string(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage=KEEP)
    for key in (123, None, [WRITE_KEY], {"k": 1}):
        got, doc, _ = await post(client, "/v1/track", {**GOOD, "writeKey": key}, auth=False, strict=True)
        assert (got, doc["reason"]) == (401, "auth"), key
        got, doc, _ = await post(client, "/v1/batch", {"batch": [track("m-1")], "writeKey": key}, auth=False,
                                 strict=True)
        assert (got, doc["reason"]) == (401, "auth"), key
    assert spool_calls(tmp_path) == []


# -- content encodings -------------------------------------------------------------------

@pytest.mark.parametrize("encoding,compress", [
    ("gzip", gzip.compress),
    ("x-gzip", gzip.compress),
    ("GZIP", gzip.compress),
    ("deflate", zlib.compress), ("deflate", raw_deflate), ("identity", lambda b: b),
], ids=["gzip", "x-gzip", "GZIP", "deflate-zlib", "deflate-raw", "identity"])
@pytest.mark.parametrize("path", ["/v1/track", "/v1/batch"])
async def test_compressed_bodies_are_stored(gateway_client: Any, tmp_path: Path, encoding: str, compress: Any,
                                            path: str) -> None:
    """README.md: ``Content-Encoding: gzip|deflate`` (deflate both as zlib and
    raw, as HTTP clients disagree); docs/pipelines-api.md table."""
    client = await gateway_client(storage=KEEP)
    payload = GOOD if path == "/v1/track" else {"batch": [track("m-1"), track("m-2")]}
    got, doc, _ = await post(client, path, compress(msgspec.json.encode(payload)), strict=True,
                             headers={"Content-Encoding": encoding})
    assert (got, doc) == (200, {})
    want = ["good-1"] if path == "/v1/track" else ["m-1", "m-2"]
    assert [c["messageId"] for c in spool_calls(tmp_path)] == want


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lax"])
async def test_broken_gzip_never_500(gateway_client: Any, tmp_path: Path, strict: bool) -> None:
    """Invalid gzip in every shape: 400 in strict mode, 200 in lax, never a
    500 and never stored (docs/pipelines-api.md table)."""
    client = await gateway_client(storage=KEEP)
    good = gzip.compress(msgspec.json.encode(GOOD))
    bodies = {
        "garbage": b"\x00\x01garbage",
        "gzip-magic-then-garbage": b"\x1f\x8b\x08\x00" + b"\xff" * 40,
        "truncated-mid-stream": good[: len(good) // 2],
        "empty": b"",
        "plain-json-declared-gzip": msgspec.json.encode(GOOD),
        "zlib-declared-gzip": zlib.compress(msgspec.json.encode(GOOD)),
    }
    for name, data in bodies.items():
        got, doc, _ = await post(client, "/v1/track", data, strict=strict, headers={"Content-Encoding": "gzip"})
        if strict:
            assert got == 400, (name, doc)
            assert doc["reason"] in ("encoding", "json"), (name, doc)
        else:
            assert (got, doc) == (200, {}), name
    assert spool_calls(tmp_path) == []
    ms = await metrics(client)
    assert not [k for k in ms if k[0] == "gateway_http_requests_total" and dict(k[1])["status"] == "500"]


@pytest.mark.xfail(reason="known limitation: aiohttp inflates gzip bodies and never checks that the stream "
                          "ended (it does for deflate), so a gzip body cut before its 8-byte trailer is accepted "
                          "when what was inflated is valid JSON", strict=True)
async def test_gzip_without_trailer_is_an_encoding_error(gateway_client: Any, tmp_path: Path) -> None:
    """docs/pipelines-api.md: invalid gzip → 400 in strict mode."""
    client = await gateway_client(storage=KEEP)
    data = gzip.compress(msgspec.json.encode(GOOD))[:-8]
    got, doc, _ = await post(client, "/v1/track", data, strict=True, headers={"Content-Encoding": "gzip"})
    assert (got, doc.get("reason")) == (400, "encoding")
    assert spool_calls(tmp_path) == []


# -- limits --------------------------------------------------------------------------------

async def test_max_event_bytes_on_a_single_call_is_exact(gateway_client: Any, tmp_path: Path) -> None:
    """server.max_event_bytes bounds one call (docs/pipelines-api.md,
    "Maximum request sizes"): exactly the limit passes, one byte more fails,
    also when it only grows past the limit once decompressed."""
    client = await gateway_client(server=LIMITS, storage=KEEP)
    at = padded({**GOOD, "messageId": "at-limit"}, MAX_EVENT)
    over = padded({**GOOD, "messageId": "over"}, MAX_EVENT + 1)
    assert (await post(client, "/v1/track", at, strict=True))[:2] == (200, {})
    got, doc, _ = await post(client, "/v1/track", over, strict=True)
    assert (got, doc["reason"], doc["limit"], doc["field"]) == (400, "size", MAX_EVENT, "body")
    got, doc, _ = await post(client, "/v1/track", gzip.compress(over), strict=True,
                             headers={"Content-Encoding": "gzip"})
    assert (got, doc["reason"], doc["limit"]) == (400, "size", MAX_EVENT)
    assert "decompressed" in doc["error"]
    assert (await post(client, "/v1/track", over))[:2] == (200, {})

    async def chunked() -> Any:  # no Content-Length: the limit is counted while reading
        yield over[:500]
        yield over[500:]

    resp = await client.post("/v1/track", data=chunked(), headers={**AUTH_HEADERS, **STRICT_HEADERS})
    doc = await resp.json()
    assert (resp.status, doc["reason"], doc["limit"]) == (400, "size", MAX_EVENT)
    assert [c["messageId"] for c in spool_calls(tmp_path)] == ["at-limit"]


async def test_max_batch_bytes_is_exact(gateway_client: Any, tmp_path: Path) -> None:
    """server.max_batch_bytes bounds a batch request (docs/pipelines-api.md,
    "Maximum request sizes"), before and after decompression."""
    client = await gateway_client(server=LIMITS, storage=KEEP)

    def batch_of(size: int, tag: str) -> bytes:
        head = msgspec.json.encode({"batch": [track(f"m-{tag}-0")], "pad": ""})
        doc = {"batch": [track(f"m-{tag}-0")], "pad": "x" * (size - len(head))}
        data = msgspec.json.encode(doc)
        assert len(data) == size
        return data

    assert (await post(client, "/v1/batch", batch_of(MAX_BATCH, "at"), strict=True))[:2] == (200, {})
    got, doc, _ = await post(client, "/v1/batch", batch_of(MAX_BATCH + 1, "over"), strict=True)
    assert (got, doc["reason"], doc["limit"]) == (400, "size", MAX_BATCH)
    got, doc, _ = await post(client, "/v1/batch", gzip.compress(batch_of(MAX_BATCH + 1, "gz")), strict=True,
                             headers={"Content-Encoding": "gzip"})
    assert (got, doc["reason"], doc["limit"]) == (400, "size", MAX_BATCH)
    assert [c["messageId"] for c in spool_calls(tmp_path)] == ["m-at-0"]


async def test_max_event_bytes_applies_to_each_call_of_a_batch(gateway_client: Any, tmp_path: Path) -> None:
    """docs/pipelines-api.md, "Batch requests": a limit per call in
    the request; the oversized call is rejected by index, the others stored."""
    client = await gateway_client(server=LIMITS, storage=KEEP)
    big = msgspec.json.decode(padded(track("m-big"), MAX_EVENT + 200))
    got, doc, _ = await post(client, "/v1/batch", {"batch": [track("m-0"), big, track("m-2")]}, strict=True)
    assert got == 400
    assert [(e["index"], e["reason"], e["field"], e["limit"]) for e in doc["errors"]] == [
        (1, "size", "batch[1]", MAX_EVENT)]
    assert (await post(client, "/v1/batch", {"batch": [track("m-3"), big]}))[:2] == (200, {})
    assert [c["messageId"] for c in spool_calls(tmp_path)] == ["m-0", "m-2", "m-3"]
    ms = await metrics(client)
    assert sample(ms, "gateway_calls_rejected_total", reason="size") == 2


async def test_batch_call_at_the_limit_is_accepted_like_a_single_call(gateway_client: Any, tmp_path: Path) -> None:
    """docs/pipelines-api.md: "32KB per call in the request": the
    call as sent, the same measure as for a single call."""
    client = await gateway_client(server=LIMITS, storage=KEEP)
    call = padded({"userId": "u1", "event": "Clicked", "messageId": "alone"}, MAX_EVENT)
    assert (await post(client, "/v1/track", call, strict=True))[:2] == (200, {})
    in_batch = msgspec.json.decode(padded({"type": "track", "userId": "u1", "event": "Clicked",
                                           "messageId": "in-batch"}, MAX_EVENT))
    got, doc, _ = await post(client, "/v1/batch", {"batch": [in_batch]}, strict=True)
    assert (got, doc) == (200, {})
    assert [c["messageId"] for c in spool_calls(tmp_path)] == ["alone", "in-batch"]


async def test_gzip_bomb_is_refused_without_inflating_it(gateway_process: Any, tmp_path: Path) -> None:
    """A small gzip body that inflates to 200 MB: refused once past
    max_batch_bytes (400 strict, 200 lax), and the server process's peak memory
    stays far below the inflated size (read from /proc/PID/status)."""
    import aiohttp
    proc = await gateway_process(server={"max_batch_bytes": "1MiB", "max_event_bytes": "64KiB"})
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b" " * (1 << 20)
    bomb = co.compress(b'{"batch": [') + b"".join(co.compress(chunk) for _ in range(200)) + co.flush()
    assert len(bomb) < 1 << 20, "the compressed body itself is under the limit"

    def peak_kib() -> int:
        assert proc.proc is not None
        for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    before = peak_kib()
    async with aiohttp.ClientSession() as s:
        for strict, want in ((True, 400), (False, 200)):
            async with s.post(f"{proc.url}/v1/batch", data=bomb,
                              headers={**AUTH_HEADERS, "Content-Encoding": "gzip",
                                       **(STRICT_HEADERS if strict else {})}) as r:
                assert r.status == want
                doc = await r.json()
                if strict:
                    assert (doc["reason"], doc["limit"]) == ("size", 1 << 20)
                else:
                    assert doc == {}
        # The server is alive and well afterwards.
        async with s.post(f"{proc.url}/v1/track", json=GOOD, headers=AUTH_HEADERS) as r:
            assert r.status == 200
    grown_mib = (peak_kib() - before) / 1024
    print(f"gzip bomb: peak RSS {before} KiB before, grew {grown_mib:.1f} MiB")
    assert grown_mib < 48, f"peak RSS grew by {grown_mib:.0f} MiB for a 200 MiB bomb"


# -- text/plain, paths ---------------------------------------------------------------------

async def test_text_plain_bodies(gateway_client: Any, tmp_path: Path) -> None:
    """README.md: text/plain bodies too (browsers' sendBeacon), key in the body."""
    client = await gateway_client(storage=KEEP)
    h = {"Content-Type": "text/plain;charset=UTF-8"}
    assert (await post(client, "/v1/track", {**GOOD, "writeKey": WRITE_KEY}, auth=False, headers=h))[:2] == (200, {})
    assert (await post(client, "/v1/batch", {"batch": [track("m-1")], "writeKey": WRITE_KEY}, auth=False,
                       headers=h))[:2] == (200, {})
    assert (await post(client, "/v1/track", {**GOOD, "writeKey": WRITE_KEY, "messageId": "good-2"}, auth=False,
                       headers={"Content-Type": "application/x-www-form-urlencoded"}))[:2] == (200, {})
    assert [c["messageId"] for c in spool_calls(tmp_path)] == ["good-1", "m-1", "good-2"]


@pytest.mark.parametrize("path,type_", [
    ("/v1/i", "identify"), ("/v1/t", "track"), ("/v1/p", "page"), ("/v1/s", "screen"),
    ("/v1/g", "group"), ("/v1/a", "alias"),
    ("/v1/identify", "identify"), ("/v1/track", "track"), ("/v1/page", "page"), ("/v1/screen", "screen"),
    ("/v1/group", "group"), ("/v1/alias", "alias"),
])
async def test_single_call_paths(gateway_client: Any, tmp_path: Path, path: str, type_: str) -> None:
    """README.md, "HTTP API": the Pipelines paths and the browser short aliases,
    text/plain with the key in the body; the path gives the type."""
    client = await gateway_client(storage=KEEP)
    call = {"userId": "u1", **EXTRA[type_], "messageId": "x", "writeKey": WRITE_KEY}
    got, doc, _ = await post(client, path, call, auth=False, strict=True, headers={"Content-Type": "text/plain"})
    assert (got, doc) == (200, {})
    [c] = spool_calls(tmp_path)
    assert (c["type"], c["messageId"]) == (type_, "x")
    ms = await metrics(client)
    assert sample(ms, "gateway_http_requests_total", endpoint=path, status="200") == 1


@pytest.mark.parametrize("path", ["/v1/batch", "/v1/import", "/v1/b"])
async def test_batch_paths(gateway_client: Any, tmp_path: Path, path: str) -> None:
    """docs/pipelines-api.md, "Batch requests"; README.md: /v1/import
    is a synonym of batch and /v1/b the browser alias."""
    client = await gateway_client(storage=KEEP)
    calls = [{"type": t, "userId": "u1", **EXTRA[t], "messageId": t} for t in EXTRA]
    got, doc, _ = await post(client, path, {"batch": calls, "writeKey": WRITE_KEY}, auth=False, strict=True,
                             headers={"Content-Type": "text/plain"})
    assert (got, doc) == (200, {})
    assert [(c["type"], c["messageId"]) for c in spool_calls(tmp_path)] == [(t, t) for t in EXTRA]
    rows = spool_rows(tmp_path)
    assert {r[0] for r in rows} == {"web"} and sum(r[1] for r in rows) == 6


async def test_unknown_paths_and_methods(gateway_client: Any, tmp_path: Path) -> None:
    """Only the documented paths exist (README.md, "HTTP API")."""
    client = await gateway_client(storage=KEEP)
    for path in ("/v1/xyz", "/v1/tracks", "/v2/track", "/v1/track/extra", "/track"):
        got, _, _ = await post(client, path, GOOD)
        assert got == 404, path
    resp = await client.get("/v1/track")
    assert resp.status == 405
    assert spool_calls(tmp_path) == []


# -- health, readiness, overload ----------------------------------------------------------

async def test_health_and_ready(gateway_client: Any) -> None:
    """README.md: GET /health (alive), GET /ready (spool writable, config loaded)."""
    client = await gateway_client(storage=KEEP)
    resp = await client.get("/health")
    assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    resp = await client.get("/ready")
    assert (resp.status, await resp.json()) == (200, {"status": "ready"})


async def test_ready_is_503_when_the_spool_is_full(gateway_client: Any, tmp_path: Path) -> None:
    """README.md: /ready means the spool can take calls; a spool already
    holding storage.max_bytes (say, after max_bytes was lowered) is not ready,
    and calls get 503 + Retry-After in both modes."""
    spool = SqliteSpool(spool_path(tmp_path), 1 << 30)
    await spool.open()
    await spool.append("web", [b'{"type":"track","userId":"u0","event":"e","messageId":"old"}'] * 10)
    await spool.close()
    client = await gateway_client(storage={**KEEP, "max_bytes": 100})
    resp = await client.get("/ready")
    assert resp.status == 503
    doc = await resp.json()
    assert doc["status"] == "not ready" and any("storage.max_bytes" in p for p in doc["problems"]), doc
    for strict in (True, False):
        got, doc, resp = await post(client, "/v1/track", GOOD, strict=strict)
        assert (got, doc["reason"]) == (503, "overload")
        assert int(resp.headers["Retry-After"]) > 0
    assert [c["messageId"] for c in spool_calls(tmp_path)] == ["old"] * 10


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lax"])
async def test_503_with_retry_after_when_max_bytes_is_exceeded(gateway_client: Any, tmp_path: Path,
                                                               strict: bool) -> None:
    """README.md: "Overload (spool full, storage failing): 503 with Retry-After,
    in both modes ... Never a 200 for data that was not stored"."""
    client = await gateway_client(storage={**KEEP, "max_bytes": 600})
    assert (await post(client, "/v1/track", {**GOOD, "messageId": "fits"}, strict=strict))[:2] == (200, {})
    big = msgspec.json.decode(padded({**GOOD, "messageId": "too-much"}, 500))
    got, doc, resp = await post(client, "/v1/track", big, strict=strict)
    assert got == 503, doc
    assert doc["reason"] == "overload" and "max_bytes" in doc["error"]
    assert resp.headers["Retry-After"].isdigit() and int(resp.headers["Retry-After"]) > 0
    got, doc, resp = await post(client, "/v1/batch", {"batch": [track("m-1"), track("m-2"), track("m-3")]},
                                strict=strict)
    assert got == 503 and "Retry-After" in resp.headers
    assert [c["messageId"] for c in spool_calls(tmp_path)] == ["fits"]
    ms = await metrics(client)
    assert sample(ms, "gateway_calls_rejected_total", reason="overload") == 4
    assert sample(ms, "gateway_calls_accepted_total", source="web") == 1
    assert sample(ms, "gateway_http_requests_total", endpoint="/v1/track", status="503") == 1
    assert sample(ms, "gateway_http_requests_total", endpoint="/v1/batch", status="503") == 1
    assert sample(ms, "gateway_spool_max_bytes") == 600


# -- metrics -----------------------------------------------------------------------------------

async def test_metrics_count_requests_calls_and_the_spool(gateway_client: Any, tmp_path: Path) -> None:
    """README.md: "every drop is counted in /metrics with its reason"; the spool
    gauges and the commit latency histogram describe the spool file."""
    client = await gateway_client(storage=KEEP, sources=WEB_AND_APP)
    for i in range(3):
        assert (await post(client, "/v1/track", track(f"m-{i}")))[0] == 200
    assert (await post(client, "/v1/batch", {"batch": [track("m-10"), track("m-11"), {"type": "track"}]}))[0] == 200
    assert (await post(client, "/v1/identify", {"traits": {}}))[0] == 200
    assert (await post(client, "/v1/track", b"{", strict=True))[0] == 400
    assert (await post(client, "/v1/track", GOOD, auth=False))[0] == 200
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    assert (await post(client, "/v1/track", track("m-20"), auth=False, headers=other))[0] == 200
    ms = await metrics(client)
    assert sample(ms, "gateway_calls_accepted_total", source="web") == 5
    assert sample(ms, "gateway_calls_accepted_total", source="app") == 1
    assert sample(ms, "gateway_calls_rejected_total", reason="missing_field") == 2
    assert sample(ms, "gateway_calls_rejected_total", reason="json") == 1
    assert sample(ms, "gateway_calls_rejected_total", reason="auth") == 1
    assert sample(ms, "gateway_http_requests_total", endpoint="/v1/track", status="200") == 5
    assert sample(ms, "gateway_http_requests_total", endpoint="/v1/track", status="400") == 1
    assert sample(ms, "gateway_http_requests_total", endpoint="/v1/batch", status="200") == 1
    assert sample(ms, "gateway_http_requests_total", endpoint="/v1/identify", status="200") == 1
    rows = spool_rows(tmp_path)
    assert sample(ms, "gateway_spool_calls") == sum(r[1] for r in rows) == 6
    # Bytes of the stored calls, each with its separator (a row's length + 1).
    assert sample(ms, "gateway_spool_bytes") == sum(len(r[2]) + 1 for r in rows)
    assert sample(ms, "gateway_spool_max_bytes") == 10 * 1024**3
    commits = sample(ms, "gateway_spool_commit_seconds_count")
    assert commits is not None and commits >= 5, "one group commit at least per sequential append"
    assert sample(ms, "gateway_spool_commit_seconds_bucket", le="+Inf") == commits
    assert 0 < sample(ms, "gateway_spool_commit_seconds_sum") < 60  # type: ignore[operator]
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in ms.items()
                     if k[0] == "gateway_spool_commit_seconds_bucket")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), "cumulative buckets"
    # /metrics counts itself too, and its own requests never count as calls.
    ms = await metrics(client)
    assert sample(ms, "gateway_http_requests_total", endpoint="/metrics", status="200") == 1


# -- CORS ----------------------------------------------------------------------------------------

async def test_cors_preflight_for_browser_sdks(gateway_client: Any) -> None:
    """README.md: "CORS for browser SDKs, origins from the config; preflights
    list authorization, content-type, x-retry-count explicitly"."""
    client = await gateway_client(server={"cors_origins": ["https://shop.example"]}, storage=KEEP)
    for path in ("/v1/batch", "/v1/t", "/v1/track", "/v1/import"):
        resp = await client.options(path, headers={
            "Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert resp.status == 204, path
        h = resp.headers
        assert h["Access-Control-Allow-Origin"] == "https://shop.example"
        assert h["Access-Control-Allow-Headers"] == "authorization, content-type, x-retry-count"
        assert "POST" in [m.strip() for m in h["Access-Control-Allow-Methods"].split(",")]
        assert int(h["Access-Control-Max-Age"]) > 0
        assert "Origin" in h.get("Vary", "")
    resp = await client.options("/v1/batch", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})
    assert resp.status >= 400 and "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_allow_origin_on_responses_for_allowed_origins_only(gateway_client: Any, tmp_path: Path) -> None:
    """README.md: origins from the config, per source (``sources[].cors_origins``)
    falling back to ``server.cors_origins``."""
    client = await gateway_client(server={"cors_origins": ["https://shop.example"]}, storage=KEEP,
                                  sources=[{"name": "web", "write_keys": [WRITE_KEY]},
                               {"name": "app", "write_keys": [OTHER_KEY], "cors_origins": ["https://app.example"]}])
    allowed = {"Origin": "https://shop.example"}
    got, _, resp = await post(client, "/v1/track", GOOD, headers=allowed)
    assert got == 200 and resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    got, _, resp = await post(client, "/v1/track", {"userId": "u1"}, strict=True, headers=allowed)
    assert got == 400 and resp.headers["Access-Control-Allow-Origin"] == "https://shop.example", \
        "a browser SDK must be able to read the error"
    got, _, resp = await post(client, "/v1/track", GOOD, headers={"Origin": "https://evil.example"})
    assert got == 200 and "Access-Control-Allow-Origin" not in resp.headers
    got, _, resp = await post(client, "/v1/track", GOOD, headers={"Origin": "https://app.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers, "web's origins do not include app's"
    got, _, resp = await post(client, "/v1/track", GOOD, auth=False,
                              headers={"Origin": "https://app.example", "Authorization": f"Bearer {OTHER_KEY}"})
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    got, _, resp = await post(client, "/v1/track", GOOD, auth=False,
                              headers={"Origin": "https://shop.example", "Authorization": f"Bearer {OTHER_KEY}"})
    assert "Access-Control-Allow-Origin" not in resp.headers, "app does not allow shop's origin"
    resp = await client.get("/health", headers=allowed)
    assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"


async def test_concurrent_requests_are_each_stored_once(gateway_client: Any, tmp_path: Path) -> None:
    """Group commit under concurrency: 40 requests at once, every call stored
    exactly once, every answer 200 {}."""
    client = await gateway_client(storage=KEEP)
    results = await asyncio.gather(*(post(client, "/v1/batch", {"batch": [track(f"m-{i}-a"), track(f"m-{i}-b")]})
                                     for i in range(40)))
    assert all(r[:2] == (200, {}) for r in results)
    ids = [c["messageId"] for c in spool_calls(tmp_path)]
    assert sorted(ids) == sorted(f"m-{i}-{s}" for i in range(40) for s in "ab")
    assert sum(r[1] for r in spool_rows(tmp_path)) == 80
