"""Customer.io's Track API coming in, over HTTP (docs/track-api-coming-in.md):
authentication, Track's validation and limits and the bodies that name the
problem, a v2 batch's per-operation answer, overload, source transforms,
metrics, and a Track call forwarded to Customer.io's Track API arriving as
the same operation.  Everything runs against the real app and spool."""

from __future__ import annotations

import base64
import gzip
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from fake_customerio import SITE_ID as CIO_SITE_ID, TRACK_API_KEY as CIO_API_KEY, FakeCustomerIO
from gateway.testing import WRITE_KEY as KEY, metrics, sample, spool_calls as stored, spool_query
from gateway.track_api import validation
from gateway.track_api.validation import TrackError

KEEP = {"retention": 3600}  # what was stored stays in the spool for the test to read


def spool_rows(tmp_path: Path) -> list[tuple[str, int, bytes]]:
    """(source, count, data) of each row the spool holds."""
    return [tuple(r) for r in spool_query(tmp_path, "SELECT source, count, data FROM events ORDER BY seq")]


SITE_ID, API_KEY = "site-1", "key-1"
OTHER_SITE_ID, OTHER_API_KEY = "site-2", "key-2"
SOURCES = [
    {"name": "web", "write_keys": [KEY]},
    {"name": "classic", "kind": "track_api", "track_api": {"site_id": SITE_ID, "api_key": API_KEY}},
    {"name": "eu-workspace", "kind": "track_api", "track_api": {"site_id": OTHER_SITE_ID, "api_key": OTHER_API_KEY}},
]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


AUTH = {"Authorization": basic(SITE_ID, API_KEY)}


async def request(client: Any, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
                  auth: bool = True) -> tuple[int, Any, Any]:
    """(status, JSON body, response); ``body`` bytes go as they are, anything else as JSON."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(AUTH if auth else {}), **(headers or {})}
    resp = await client.request(method, path, data=data, headers=h)
    return resp.status, await resp.json(content_type=None), resp


def assert_error(status: int, doc: Any, want_status: int, code: str, field: str | None = None, *,
                 v2: bool = False) -> None:
    """Every error body: string ``code`` and ``message``, and Track's own shape."""
    assert status == want_status, doc
    assert isinstance(doc["code"], str) and isinstance(doc["message"], str) and doc["message"], doc
    assert doc["code"] == code, doc
    if field is not None:
        assert doc["field"] == field, doc
    if v2:
        assert doc["errors"] == [{"reason": code, "field": doc.get("field", ""), "message": doc["message"]}]
    else:
        assert doc["meta"] == {"errors": [doc["message"]]}


# -- authentication -------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [
    None, f"Bearer {API_KEY}", basic(SITE_ID, "wrong"), basic("wrong", API_KEY), basic(SITE_ID, ""),
    basic(SITE_ID, API_KEY + "x"), basic(SITE_ID, OTHER_API_KEY), "Basic !!!not-base64", "Basic " +
    base64.b64encode(SITE_ID.encode()).decode(), basic(KEY, ""),
], ids=["missing", "bearer", "wrong-key", "wrong-site", "empty-key", "longer-key", "other-sources-key",
        "not-base64", "no-colon", "pipelines-write-key"])
async def test_wrong_or_missing_credentials_are_401(gateway_client: Any, tmp_path: Path, header: str | None) -> None:
    client = await gateway_client(storage=KEEP, sources=SOURCES)
    status, doc, resp = await request(client, "PUT", "/api/v1/customers/u-1", {"plan": "pro"}, auth=False,
                                      headers={"Authorization": header} if header else {})
    assert_error(status, doc, 401, "auth", "Authorization")
    assert resp.headers["WWW-Authenticate"].startswith("Basic")
    status, doc, _ = await request(client, "POST", "/api/v2/batch", {"batch": []}, auth=False,
                                   headers={"Authorization": header} if header else {})
    assert_error(status, doc, 401, "auth", "Authorization", v2=True)
    assert stored(tmp_path) == []


async def test_each_sources_credentials_file_calls_under_that_source(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage=KEEP, sources=SOURCES)
    assert (await request(client, "PUT", "/api/v1/customers/u-1", {"plan": "a"}))[:2] == (200, {})
    assert (await request(client, "PUT", "/api/v1/customers/u-2", {"plan": "b"},
                          headers={"Authorization": basic(OTHER_SITE_ID, OTHER_API_KEY)}))[:2] == (200, {})
    assert [source for source, _, _ in spool_rows(tmp_path)] == ["classic", "eu-workspace"]
    assert [c["userId"] for c in stored(tmp_path)] == ["u-1", "u-2"]


async def test_credentials_are_compared_in_constant_time_with_every_source(
        gateway_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hmac.compare_digest for the site id and for the key of every source,
    also after a match and also when the site id already differs."""
    client = await gateway_client(storage=KEEP, sources=SOURCES)
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)
    monkeypatch.setattr(hmac, "compare_digest", spy)
    for header in (basic(SITE_ID, API_KEY), basic("nobody", "nothing")):
        compared.clear()
        await request(client, "PUT", "/api/v1/customers/u-1", {}, headers={"Authorization": header}, auth=False)
        known = {SITE_ID.encode(), API_KEY.encode(), OTHER_SITE_ID.encode(), OTHER_API_KEY.encode()}
        assert len(compared) == 4 and {a for a, _ in compared} == known, compared


# -- validation and limits ------------------------------------------------------------------------

LONG = "x" * 151
REFUSED = [
    # (method, path, body, code, field)
    ("PUT", "/api/v1/customers/" + LONG, {}, "limit", "path.identifier"),
    ("PUT", "/api/v1/customers/u", {LONG: 1}, "limit", "attributes"),
    ("PUT", "/api/v1/customers/u", {"bio": "é" * 501}, "limit", "attributes.bio"),
    ("PUT", "/api/v1/customers/u", {"prefs": {"k": "v" * 1000}}, "limit", "attributes.prefs"),
    ("PUT", "/api/v1/customers/u", {f"a{i}": i for i in range(301)}, "limit", "attributes"),
    ("PUT", "/api/v1/customers/u", {"id": LONG}, "limit", "attributes.id"),
    ("PUT", "/api/v1/customers/u", {"email": ["a@example.com"]}, "bad_field", "attributes.email"),
    ("PUT", "/api/v1/customers/u", {"_timestamp": "yesterday"}, "bad_field", "_timestamp"),
    ("PUT", "/api/v1/customers/u", {"cio_relationships": {"action": "add_relationship"}}, "bad_field",
     "cio_relationships.action"),
    ("PUT", "/api/v1/customers/u", {"cio_relationships": {"relationships": [
        {"identifiers": {"object_type_id": "0", "object_id": "a"}}]}}, "bad_field",
     "cio_relationships.relationships[0].identifiers.object_type_id"),
    ("PUT", "/api/v1/customers/u", {"cio_relationships": {"relationships": [
        {"identifiers": {"object_type_id": "1"}}]}}, "missing_field",
     "cio_relationships.relationships[0].identifiers.object_id"),
    ("PUT", "/api/v1/customers/u", b"{not json", "json", "body"),
    ("PUT", "/api/v1/customers/u", b"[1, 2]", "json", "body"),
    ("POST", "/api/v1/customers/u/events", {"data": {}}, "missing_field", "name"),
    ("POST", "/api/v1/customers/u/events", {"name": "   "}, "missing_field", "name"),
    ("POST", "/api/v1/customers/u/events", {"name": 7}, "bad_field", "name"),
    ("POST", "/api/v1/customers/u/events", {"name": "e" * 101}, "limit", "name"),
    ("POST", "/api/v1/customers/u/events", {"name": "e", "data": [1]}, "bad_field", "data"),
    ("POST", "/api/v1/customers/u/events", {"name": "e", "type": "click"}, "bad_field", "type"),
    ("POST", "/api/v1/customers/u/events", {"name": "e", "timestamp": "2024-01-01"}, "bad_field", "timestamp"),
    ("POST", "/api/v1/customers/u/events", {"name": "e", "properties": {}}, "unknown_field", "properties"),
    ("POST", "/api/v1/customers/u/events", b"", "json", "body"),
    ("POST", "/api/v1/events", {"anonymous_id": "a"}, "missing_field", "name"),
    ("PUT", "/api/v1/customers/u/devices", {}, "missing_field", "device"),
    ("PUT", "/api/v1/customers/u/devices", {"device": {"platform": "ios"}}, "missing_field", "device.id"),
    ("PUT", "/api/v1/customers/u/devices", {"device": {"id": "t", "platform": "windows"}}, "bad_field",
     "device.platform"),
    ("PUT", "/api/v1/customers/u/devices", {"device": {"id": "t", "platform": "ios", "attributes": {"n": 1}}},
     "bad_field", "device.attributes.n"),
    ("PUT", "/api/v1/customers/u/devices", {"device": {"id": "t", "platform": "ios", "model": "x"}},
     "unknown_field", "device.model"),
    ("POST", "/api/v1/merge_customers", {"primary": {"id": "1", "email": "a@example.com"}, "secondary": {"id": "2"}},
     "bad_field", "primary"),
    ("POST", "/api/v1/merge_customers", {"primary": {"id": "1"}}, "missing_field", "secondary"),
    ("POST", "/api/v2/entity", {"action": "identify", "identifiers": {"id": "1"}}, "missing_field", "type"),
    ("POST", "/api/v2/entity", {"type": "account", "action": "identify"}, "bad_field", "type"),
    ("POST", "/api/v2/entity", {"type": "person", "action": "fly", "identifiers": {"id": "1"}}, "bad_field",
     "action"),
    ("POST", "/api/v2/entity", {"type": "person", "action": "identify"}, "missing_field", "identifiers"),
    ("POST", "/api/v2/entity", {"type": "person", "action": "identify", "identifiers": {"phone": "+1555"}},
     "bad_field", "identifiers.phone"),
    ("POST", "/api/v2/entity", {"type": "person", "action": "identify", "identifiers": {"id": "1", "email": "a@b.co"}},
     "bad_field", "identifiers"),
    ("POST", "/api/v2/entity", {"type": "person", "action": "identify", "identifiers": {"id": ""}},
     "missing_field", "identifiers.id"),
    ("POST", "/api/v2/entity", {"type": "person", "action": "event", "identifiers": {"id": "1"}, "name": "e",
                                "data": {}}, "unknown_field", "data"),
    ("POST", "/api/v2/entity", {"type": "person", "action": "event", "identifiers": {"id": "1"}, "name": "e",
                                "timestamp": True}, "bad_field", "timestamp"),
    ("POST", "/api/v2/entity", {"type": "object", "action": "delete", "identifiers": {"cio_object_id": "x"}},
     "unsupported", "identifiers.cio_object_id"),
    ("POST", "/api/v2/entity", {"type": "object", "action": "identify",
                                "identifiers": {"object_type_id": "1", "object_id": "o" * 151}},
     "limit", "identifiers.object_id"),
    ("POST", "/api/v2/entity", {"type": "object", "action": "add_relationships",
                                "identifiers": {"object_type_id": "1", "object_id": "o"},
                                "cio_relationships": [{"identifiers": {"id": "1"},
                                                       "relationship_attributes": {"r": "v" * 1001}}]},
     "limit", "cio_relationships[0].relationship_attributes.r"),
    ("POST", "/api/v2/entity", {"type": "delivery", "action": "event", "identifiers": {"id": "d"},
                                "name": "clicked", "attributes": {}}, "bad_field", "name"),
    ("POST", "/api/v2/entity", [{"type": "person"}], "json", ""),
]


@pytest.mark.parametrize("method,path,body,code,field", REFUSED,
                         ids=[f"{i}-{r[1].rsplit('/', 1)[-1][:20]}-{r[3]}" for i, r in enumerate(REFUSED)])
async def test_track_refuses_with_a_400_that_names_the_problem(
        gateway_client: Any, tmp_path: Path, method: str, path: str, body: Any, code: str, field: str) -> None:
    client = await gateway_client(storage=KEEP, sources=SOURCES)
    status, doc, _ = await request(client, method, path, body)
    assert_error(status, doc, 400, code, field or None, v2=path.startswith("/api/v2/"))
    assert stored(tmp_path) == []
    ms = await metrics(client)
    assert sample(ms, "gateway_calls_rejected_total", reason=code) == 1


def sized(body: dict[str, Any], size: int) -> bytes:
    """``body`` as compact JSON of exactly ``size`` bytes, padded in attributes of at most 1000 bytes."""
    body = dict(body)
    i = 0
    while True:
        data = json.dumps(body, separators=(",", ":")).encode()
        if len(data) >= size:
            break
        key = f"pad{i}"
        room = size - len(data) - len(f',"{key}":""')
        if room < 0:
            break
        body[key] = "x" * min(room, 1000)
        i += 1
    data = json.dumps(body, separators=(",", ":")).encode()
    assert len(data) == size, (len(data), size)
    return data


@pytest.mark.parametrize("path,base", [
    ("/api/v1/customers/u-1", {"plan": "pro"}),
    ("/api/v2/entity", {"type": "person", "action": "identify", "identifiers": {"id": "u-1"}, "attributes": {}}),
], ids=["v1", "entity"])
async def test_a_request_may_have_32000_bytes_and_not_one_more(
        gateway_client: Any, tmp_path: Path, path: str, base: dict[str, Any]) -> None:
    client = await gateway_client(storage=KEEP, sources=SOURCES)
    method = "PUT" if "customers" in path else "POST"

    def body_of(size: int) -> bytes:
        """Padded at the top level of a v1 identify, or inside the v2 attributes."""
        if path.endswith("entity"):
            overhead = len(json.dumps({**base, "attributes": {}}, separators=(",", ":")))
            attrs = sized({}, size - overhead + 2)
            return json.dumps({**base, "attributes": json.loads(attrs)}, separators=(",", ":")).encode()
        return sized(base, size)
    exact, over = body_of(32_000), body_of(32_001)
    assert (len(exact), len(over)) == (32_000, 32_001)
    assert (await request(client, method, path, exact))[:2] == (200, {})
    status, doc, _ = await request(client, method, path, over)
    assert_error(status, doc, 400, "size", "body", v2=path.startswith("/api/v2/"))
    assert len(stored(tmp_path)) == 1


@pytest.mark.parametrize("method,path,good,bad", [
    ("PUT", "/api/v1/customers/u", {"bio": "é" * 500}, {"bio": "é" * 500 + "x"}),
    ("PUT", "/api/v1/customers/u", {"a" * 150: 1}, {"a" * 151: 1}),
    ("PUT", "/api/v1/customers/u", {f"a{i}": i for i in range(300)}, {f"a{i}": i for i in range(301)}),
    ("PUT", "/api/v1/customers/" + "i" * 150, {}, None),
    ("POST", "/api/v1/customers/u/events", {"name": "e" * 100}, {"name": "e" * 101}),
    ("POST", "/api/v1/customers/u/events", {"name": "/" + "p" * 300, "type": "page"}, None),
], ids=["attribute-value", "attribute-name", "attribute-count", "id", "event-name", "page-name-unlimited"])
async def test_limits_are_exact(gateway_client: Any, tmp_path: Path, method: str, path: str, good: Any, bad: Any) -> None:
    client = await gateway_client(storage=KEEP, sources=SOURCES)
    assert (await request(client, method, path, good))[:2] == (200, {})
    if bad is not None:
        assert (await request(client, method, path, bad))[0] == 400
    assert len(stored(tmp_path)) == 1


def test_event_data_may_have_100000_bytes() -> None:
    """Unreachable through a 32,000-byte request, so checked on the function."""
    data = json.loads(sized({}, 100_000))
    assert validation.event_data(data) == data
    with pytest.raises(TrackError) as e:
        validation.event_data(json.loads(sized({}, 100_001)))
    assert (e.value.code, e.value.field) == ("limit", "data")


# -- v2 batch ---------------------------------------------------------------------------------------

def person_event(n: int) -> dict[str, Any]:
    return {"type": "person", "action": "event", "identifiers": {"id": f"u-{n}"}, "name": f"Event {n}"}


async def test_a_batch_stores_its_good_operations_and_reports_the_others_by_index(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage=KEEP, sources=SOURCES)
    too_big = {**person_event(2), "attributes": json.loads(sized({}, 32_001 - 90))}
    assert 32_000 < len(json.dumps(too_big)) < 32_100
    batch = [person_event(0), {"type": "person", "action": "event", "name": "no one"}, too_big, 7,
             {"type": "person", "action": "delete", "identifiers": {"id": "u-4"}, "extra": 1}, person_event(5)]
    status, doc, _ = await request(client, "POST", "/api/v2/batch", {"batch": batch})
    assert status == 207, doc
    assert doc["code"] == "partial" and "4 of 6" in doc["message"]
    assert [(e["batch_index"], e["reason"], e["field"]) for e in doc["errors"]] == [
        (1, "missing_field", "identifiers"), (2, "size", ""), (3, "json", ""), (4, "unknown_field", "extra")]
    assert all(isinstance(e["message"], str) and e["message"] for e in doc["errors"])
    assert [c["event"] for c in stored(tmp_path)] == ["Event 0", "Event 5"]
    ms = await metrics(client)
    assert sample(ms, "gateway_calls_accepted_total", source="classic") == 2
    assert sample(ms, "gateway_http_requests_total", endpoint="POST /api/v2/batch", status="207") == 1


async def test_a_good_batch_is_200_and_keeps_its_order(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage=KEEP, sources=SOURCES)
    assert (await request(client, "POST", "/api/v2/batch", {"batch": [person_event(i) for i in range(50)]}))[:2] \
        == (200, {})
    assert [c["event"] for c in stored(tmp_path)] == [f"Event {i}" for i in range(50)]
    assert len({c["receivedAt"] for c in stored(tmp_path)}) == 1, "one request, one receive time"


@pytest.mark.parametrize("body,code", [
    (b'{"batch": {}}', "json"), (b'{"operations": []}', "json"), (b'{"batch": [], "extra": 1}', "json"),
    (b"[]", "json"), (b"{", "json"),
], ids=["batch-not-a-list", "no-batch", "unknown-key", "not-an-object", "not-json"])
async def test_a_batch_that_is_not_one_is_a_400(gateway_client: Any, tmp_path: Path, body: bytes, code: str) -> None:
    client = await gateway_client(storage=KEEP, sources=SOURCES)
    status, doc, _ = await request(client, "POST", "/api/v2/batch", body)
    assert_error(status, doc, 400, code, v2=True)


async def test_a_batch_may_have_500000_bytes_and_not_one_more(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage=KEEP, sources=SOURCES)
    def compact(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()
    ops = [{**person_event(0), "attributes": json.loads(sized({}, 20_000))}] * 24
    room = 500_000 - len(compact({"batch": ops})) - 1  # the comma before the last operation
    empty = {**person_event(0), "attributes": {}}
    last = {**empty, "attributes": json.loads(sized({}, room - len(compact(empty)) + 2))}
    exact = compact({"batch": ops + [last]})
    assert len(exact) == 500_000, len(exact)
    assert (await request(client, "POST", "/api/v2/batch", exact))[:2] == (200, {})
    over = exact[:-2] + b" ]}"
    status, doc, _ = await request(client, "POST", "/api/v2/batch", over)
    assert_error(status, doc, 400, "size", "body", v2=True)
    assert len(stored(tmp_path)) == 25


# -- storage, transforms, paths, encodings ------------------------------------------------------

async def test_no_room_in_the_spool_is_503_with_retry_after(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(sources=SOURCES, storage={**KEEP, "max_bytes": 150})
    status, doc, resp = await request(client, "PUT", "/api/v1/customers/u-1", {"plan": "p" * 200})
    assert_error(status, doc, 503, "overload")
    assert int(resp.headers["Retry-After"]) > 0
    status, doc, resp = await request(client, "POST", "/api/v2/batch", {"batch": [person_event(1), person_event(2)]})
    assert_error(status, doc, 503, "overload", v2=True)
    assert int(resp.headers["Retry-After"]) > 0
    assert stored(tmp_path) == []
    assert sample(await metrics(client), "gateway_calls_rejected_total", reason="overload") == 3


async def test_source_transforms_apply_to_track_calls(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage=KEEP, sources=SOURCES, transforms=[
        {"type": "drop_fields", "settings": {"paths": ["context.ip", "traits.plan"]}},
        {"type": "deny_events", "settings": {"events": ["User Deleted"]}}])
    assert (await request(client, "PUT", "/api/v1/customers/u-1", {"plan": "pro", "name": "Ada"}))[:2] == (200, {})
    assert (await request(client, "DELETE", "/api/v1/customers/u-1"))[:2] == (200, {})
    [identify] = stored(tmp_path)
    assert identify["traits"] == {"name": "Ada"} and "ip" not in identify["context"]
    assert sum(v for (name, _), v in (await metrics(client)).items() if name == "gateway_calls_dropped_total") == 1


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/v1/customers/u-1"), ("POST", "/api/v1/customers/u-1"), ("POST", "/api/v1/customers/u-1/segments"),
    ("POST", "/api/v1/metrics"), ("GET", "/api/v2/batch"), ("POST", "/api/v2/objects"),
])
async def test_other_track_paths_and_methods_are_a_json_404(gateway_client: Any, method: str, path: str) -> None:
    client = await gateway_client(storage=KEEP, sources=SOURCES)
    status, doc, _ = await request(client, method, path, {})
    assert_error(status, doc, 404, "not_found", v2=path.startswith("/api/v2/"))


async def test_without_a_track_api_source_there_are_no_track_endpoints(gateway_client: Any) -> None:
    client = await gateway_client(storage=KEEP)
    resp = await client.put("/api/v1/customers/u-1", json={}, headers=AUTH)
    assert resp.status == 404


async def test_a_gzip_body_is_read(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage=KEEP, sources=SOURCES)
    body = gzip.compress(json.dumps({"name": "Gzipped", "data": {"n": 1}}).encode())
    assert (await request(client, "POST", "/api/v1/customers/u-1/events", body,
                          headers={"Content-Encoding": "gzip"}))[:2] == (200, {})
    assert [c["event"] for c in stored(tmp_path)] == ["Gzipped"]


async def test_pipelines_sources_work_beside_track_sources(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage=KEEP, sources=SOURCES)
    resp = await client.post("/v1/track", json={"userId": "u", "event": "E"}, headers={"X-Strict-Mode": "1",
                                                                                         "Authorization": f"Bearer {KEY}"})
    assert (resp.status, await resp.json()) == (200, {})
    resp = await client.post("/v1/track", json={"userId": "u", "event": "E"},
                             headers={"X-Strict-Mode": "1", **AUTH})
    assert resp.status == 401, "Track credentials are no write key"
    assert [s for s, _, _ in spool_rows(tmp_path)] == ["web"]


async def test_requests_are_counted_by_endpoint(gateway_client: Any) -> None:
    client = await gateway_client(storage=KEEP, sources=SOURCES)
    await request(client, "PUT", "/api/v1/customers/u-1", {})
    await request(client, "PUT", "/api/v1/customers/u-2", {"e": "x" * 1001})
    await request(client, "PUT", "/api/v1/customers/u-2", {}, auth=False)
    ms = await metrics(client)
    endpoint = "PUT /api/v1/customers/{identifier}"
    assert [sample(ms, "gateway_http_requests_total", endpoint=endpoint, status=s) for s in ("200", "400", "401")] \
        == [1, 1, 1]
    assert sample(ms, "gateway_calls_accepted_total", source="classic") == 1


# -- forwarded to Customer.io's Track API --------------------------------------------------------

ROUND_TRIP = [
    {"type": "person", "action": "identify", "identifiers": {"id": "42"}, "timestamp": 1710948600,
     "attributes": {"first_name": "Jane", "plan": "pro"}},
    {"type": "person", "action": "event", "identifiers": {"id": "42"}, "name": "Order Completed",
     "id": "01HSE84CJTJKSF4BG1Y9JCQ5JJ", "timestamp": 1710948620, "attributes": {"total": 42}},
    {"type": "person", "action": "page", "identifiers": {"email": "jane@example.com"}, "name": "https://x.example/a",
     "id": "01HSE84CJTJKSF4BG1Y9JCQ5JK", "timestamp": 1710948630, "attributes": {"title": "A"}},
    {"type": "person", "action": "screen", "identifiers": {"cio_id": "a3000001"}, "name": "Settings",
     "id": "01HSE84CJTJKSF4BG1Y9JCQ5JM", "timestamp": 1710948640},
    {"type": "person", "action": "add_device", "identifiers": {"id": "42"},
     "device": {"token": "tok-1", "platform": "ios", "last_used": 1710948650, "attributes": {"push_enabled": "true"}}},
    {"type": "person", "action": "delete_device", "identifiers": {"id": "42"}, "device": {"token": "tok-1"}},
    {"type": "person", "action": "suppress", "identifiers": {"id": "42"}},
    {"type": "person", "action": "unsuppress", "identifiers": {"id": "42"}},
    {"type": "person", "action": "merge", "primary": {"id": "42"}, "secondary": {"email": "old@example.com"}},
    {"type": "object", "action": "identify", "identifiers": {"object_type_id": "2", "object_id": "acme"},
     "attributes": {"name": "Acme"},
     "cio_relationships": [{"identifiers": {"id": "42"}, "relationship_attributes": {"role": "admin"}}]},
    {"type": "object", "action": "delete_relationships", "identifiers": {"object_type_id": "2", "object_id": "acme"},
     "cio_relationships": [{"identifiers": {"id": "42"}}]},
    {"type": "object", "action": "delete", "identifiers": {"object_type_id": "1", "object_id": "old"}},
    {"type": "delivery", "action": "event", "identifiers": {"id": "RPIyMTM6OjEyMzQ="}, "name": "opened",
     "attributes": {"device_token": "tok-1"}},
    {"type": "person", "action": "delete", "identifiers": {"id": "42"}},
]


async def test_a_track_batch_forwarded_to_customerio_arrives_as_the_same_operations(
        gateway_client: Any, cio: FakeCustomerIO) -> None:
    """Through the gateway and its customerio_track destination, Track code
    reaches Customer.io as it did before: each operation comes out as sent."""
    client = await gateway_client(storage=KEEP, sources=SOURCES, destinations=[{
        "name": "Customer.io", "type": "customerio_track",
        "settings": {"site_id": CIO_SITE_ID, "api_key": CIO_API_KEY, "endpoint": cio.url},
        "filter": {"sources": ["classic"]}, "batch": {"max_wait": 0.01}}])
    assert (await request(client, "POST", "/api/v2/batch", {"batch": ROUND_TRIP}))[:2] == (200, {})
    await cio.wait_for(lambda: len(cio.track_ops) >= len(ROUND_TRIP))
    assert cio.track_ops == ROUND_TRIP

