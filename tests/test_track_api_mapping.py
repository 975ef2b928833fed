"""Customer.io's Track API coming in: every row and worked example of the
mapping (docs/track-api-coming-in.md, "How each Track call becomes Pipelines
calls"), table-driven from tests/data/track_api_examples.json.

Each case goes through the real path: a live app with a ``track_api``
source, Basic auth, the mapping, ``Ingest.prepare_calls`` (checks,
enrichment), the spool and delivery to a webhook destination that only takes
calls of that source; what the webhook receives is compared with the table.
The pure functions are checked on their own too, and the table and the doc
are checked to cover every endpoint and every v2 type and action.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import yarl

from gateway.ingest.timestamps import parse_iso_datetime as parse_iso
from gateway.testing import WRITE_KEY
from gateway.track_api import mapping
from gateway.track_api.routes import ENDPOINTS
from gateway.track_api.validation import TrackError, unix_time

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = json.loads((ROOT / "tests" / "data" / "track_api_examples.json").read_text())["cases"]
DOC = (ROOT / "docs" / "track-api-coming-in.md").read_text()

SITE_ID, API_KEY = "site-1", "key-1"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{SITE_ID}:{API_KEY}".encode()).decode()}
SOURCES = [{"name": "web", "write_keys": [WRITE_KEY]},
           {"name": "classic", "kind": "track_api", "track_api": {"site_id": SITE_ID, "api_key": API_KEY}}]
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def destinations(url: str) -> str:
    return f"""
        destinations:
          - name: Hook
            type: webhook
            settings: {{url: "{url}"}}
            filter: {{sources: [classic]}}
            batch: {{max_wait: 0.01}}
        """


async def send(client: Any, request: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One Track request as a client sends it; → (status, decoded JSON body)."""
    body = request["body"]
    resp = await client.request(request["method"], yarl.URL(request["path"], encoded=True),
                                data=None if body is None else json.dumps(body),
                                headers={**AUTH, "Content-Type": "application/json", **(headers or {})})
    return resp.status, await resp.json(content_type=None)


def as_written(got: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    """``got`` less what ingest adds to every call, once that is checked to be right."""
    got = copy.deepcopy(got)
    received = got.pop("receivedAt")
    assert ISO_MS.match(received), received
    message_id = got.pop("messageId")
    assert message_id == expected.get("messageId", message_id) and message_id.startswith(
        "gw-" if "messageId" not in expected else ""), message_id
    timestamp, original = got.pop("timestamp"), got.pop("originalTimestamp", None)
    if "timestamp" in expected:
        assert timestamp == original == expected["timestamp"], (timestamp, original)
    else:
        assert (timestamp, original) == (received, None), "no Track timestamp: the receive time"
    assert got["context"].pop("ip") == "127.0.0.1"
    return got


def matches(got: dict[str, Any], expected: dict[str, Any]) -> bool:
    want = {k: v for k, v in expected.items() if k not in ("messageId", "timestamp")}
    if want.get("anonymousId") == "<uuid>":
        assert UUID4.match(got.get("anonymousId", "")), got
        want["anonymousId"] = got["anonymousId"]
    assert got == want
    return True


@pytest.mark.parametrize("case", EXAMPLES, ids=[c["name"] for c in EXAMPLES])
async def test_each_track_call_reaches_a_destination_as_its_pipelines_calls(
        gateway_client: Callable[..., Any], fake_destination: Any, case: dict[str, Any]) -> None:
    client = await gateway_client(destinations(fake_destination.url), sources=SOURCES)
    status, body = await send(client, case["request"])
    assert (status, body) == (200, {}), (case["covers"], body)
    delivered = await fake_destination.wait_delivered(len(case["calls"]))
    assert len(delivered) == len(case["calls"])
    for got, expected in zip(delivered, case["calls"]):
        assert matches(as_written(got, expected), expected), case["covers"]
    assert len({c["messageId"] for c in delivered}) == len(delivered), "every call has its own messageId"


def test_the_table_covers_every_endpoint_and_every_v2_type_and_action() -> None:
    """Each endpoint and each (type, action) has at least one case (the ones
    reached through /api/v2/batch count, since batch maps each operation alike)."""
    paths = {(e.method, e.path) for e in ENDPOINTS}
    covered: set[tuple[str, str]] = set()
    actions: set[tuple[str, str]] = set()
    for case in EXAMPLES:
        req = case["request"]
        path = req["path"]
        for method, template in paths:
            pattern = "^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)) + "$"
            if method == req["method"] and re.match(pattern, path):
                covered.add((method, template))
        ops = req["body"]["batch"] if path == "/api/v2/batch" else [req["body"]] if path == "/api/v2/entity" else []
        actions |= {(op["type"], op["action"]) for op in ops}
    assert covered == paths
    assert actions == {(t, a) for t, acts in mapping.V2_ACTIONS.items() for a in acts}


def test_the_doc_names_every_endpoint_and_every_v2_type_and_action() -> None:
    for e in ENDPOINTS:
        assert f"`{e.method} {e.path}`" in DOC, e.path
    for t, acts in mapping.V2_ACTIONS.items():
        for a in acts:
            assert f"v2 `{t}` / `{a}`" in DOC, (t, a)


# -- the pure functions ------------------------------------------------------------------------

@pytest.mark.parametrize("ref,user_id,identifiers", [
    ("42", "42", {"id": "42"}),
    ("customer-id", "customer-id", {"id": "customer-id"}),
    ("jane@example.com", "jane@example.com", {"email": "jane@example.com"}),
    ("Jane.Doe+x@Sub.Example.CO", "Jane.Doe+x@Sub.Example.CO", {"email": "Jane.Doe+x@Sub.Example.CO"}),
    ("foo@localhost", "foo@localhost", {"id": "foo@localhost"}),
    ("cio_a3000001", "cio_a3000001", {"cio_id": "a3000001"}),
    ("CIO_a3000001", "CIO_a3000001", {"id": "CIO_a3000001"}),
    ("cio_", "cio_", {"id": "cio_"}),
    ("+15551234567", "+15551234567", {"id": "+15551234567"}),
])
def test_a_path_identifier_is_read_by_its_shape(ref: str, user_id: str, identifiers: dict[str, str]) -> None:
    person = mapping.path_person(ref)
    assert (person.user_id, person.identifiers) == (user_id, identifiers)


@pytest.mark.parametrize("value,iso", [
    (1361205308, "2013-02-18T16:35:08.000Z"),
    (0, "1970-01-01T00:00:00.000Z"),
    (1710948600.25, "2024-03-20T15:30:00.250Z"),
    (1710948600.2509, "2024-03-20T15:30:00.250Z"),
    (-1, "1969-12-31T23:59:59.000Z"),
    (253402300799, "9999-12-31T23:59:59.000Z"),
])
def test_unix_seconds_become_iso_utc_with_milliseconds(value: float, iso: str) -> None:
    assert unix_time(value, "timestamp") == iso
    assert parse_iso(iso) is not None


@pytest.mark.parametrize("value", ["1361205308", True, None, 253402300800, float("nan"), {"s": 1}])
def test_a_timestamp_that_is_not_unix_seconds_is_refused(value: Any) -> None:
    with pytest.raises(TrackError) as e:
        unix_time(value, "timestamp")
    assert (e.value.code, e.value.field) == ("bad_field", "timestamp")


def test_calls_of_one_request_share_no_objects() -> None:
    """A source transform that edits one call (context, traits) must not edit its sibling."""
    calls = mapping.v1_identify("u", {"cio_relationships": {"relationships": [
        {"identifiers": {"object_type_id": "1", "object_id": "a"}, "relationship_attributes": {"r": 1}},
        {"identifiers": {"object_type_id": "1", "object_id": "b"}, "relationship_attributes": {"r": 1}}]}})
    seen: dict[int, str] = {}

    def walk(value: Any, where: str) -> None:
        if isinstance(value, (dict, list)):
            assert id(value) not in seen, f"{where} is the same object as {seen[id(value)]}"
            seen[id(value)] = where
            for k, v in (value.items() if isinstance(value, dict) else enumerate(value)):
                walk(v, f"{where}.{k}")
    for i, call in enumerate(calls):
        walk(call, f"calls[{i}]")
    assert len(calls) == 3


@pytest.mark.parametrize("build", [
    lambda v: mapping.v2_operation({"type": v, "action": "identify"}),
    lambda v: mapping.v2_operation({"type": "person", "action": v}),
    lambda v: mapping.v1_event("u1", {"name": "e", "type": v}),
    lambda v: mapping.v1_add_device("u1", {"device": {"id": "t", "platform": v}}),
], ids=["v2 type", "v2 action", "v1 event type", "v1 device platform"])
def test_a_refused_value_is_shown_cut_short(build: Callable[[Any], Any]) -> None:
    """A message names the value it refused, but never echoes megabytes of it."""
    with pytest.raises(TrackError) as e:
        build(list(range(100_000)))
    assert e.value.code == "bad_field"
    assert "[0, 1, 2" in str(e.value) and len(str(e.value)) < 300, str(e.value)[:400]
