"""The ``customerio_track`` destination: the mapping of docs/customerio-track-v2.md (cited as §n
and by rule id), and sending to a strict fake of Customer.io (tests/fake_customerio.py)
over a real socket, its answers read as docs/customerio-apis.md says."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest

from fake_customerio import SITE_ID, TRACK_API_KEY, FakeCustomerIO, Invalid, validate_track_op
from gateway.api import DELIVERED, Failed, Limits, MappingError, Paused, Retry
from gateway.config import ConfigError, StorageConfig, to_struct
from gateway.http_client import HttpClient, HttpPool, Throttle
from gateway.testing import WRITE_KEY
from gateway.plugins import build_registry, make_manager
from gateway.spool import open_dead_letters
from plugins.customerio.timestamps import convert_timestamps, parse_iso_unix, to_unix
from plugins.customerio.track_fields import derive_ulid
from plugins.customerio.track_v2 import CustomerioTrackDestination as Track

DATA = json.loads((Path(__file__).parent / "data" / "customerio_track_v2_examples.json").read_text("utf-8"))
EXAMPLES = {e["name"]: e for e in DATA["examples"]}


def make(http: HttpClient | None = None, **settings: Any) -> Track:
    """A destination as the engine builds it: settings converted from the raw mapping.
    Without ``http`` (tests that only prepare), its client's pool never connects."""
    raw = {"site_id": SITE_ID, "api_key": TRACK_API_KEY, **settings}
    return Track("Customer.io", to_struct(raw, Track.Settings), http or HttpClient(HttpPool(), Throttle(1e9, 1.0)))


def op_of(call: dict[str, Any], **settings: Any) -> dict[str, Any]:
    return json.loads(make(**settings).prepare(call))


def code_of(call: dict[str, Any], **settings: Any) -> str:
    with pytest.raises(MappingError) as e:
        make(**settings).prepare(call)
    return e.value.code


# -- docs/customerio-track-v2.md §10: every worked example and edge fixture ---------------------


@pytest.mark.parametrize("example", DATA["examples"], ids=lambda e: e["name"])
def test_worked_example(example: dict[str, Any]) -> None:
    """docs/customerio-track-v2.md §10, Examples 1-20, default settings: the op equals the
    expected JSON value, or the error has the expected code."""
    if "error" in example:
        assert code_of(example["input"]) == example["error"]
    else:
        assert op_of(example["input"]) == example["expected"]


@pytest.mark.parametrize("fixture", DATA["edge_fixtures"], ids=lambda e: e["name"])
def test_edge_fixture(fixture: dict[str, Any]) -> None:
    """docs/customerio-track-v2.md §10, Edge 1-20, one case each."""
    if "error" in fixture:
        assert code_of(fixture["input"]) == fixture["error"]
    else:
        assert op_of(fixture["input"]) == fixture["expected"]


def test_example_error_message_is_informative() -> None:
    """Example 5: the message names what is missing; tests rely on the code only
    (docs/customerio-track-v2.md §1.5 C-6)."""
    with pytest.raises(MappingError) as e:
        make().prepare(EXAMPLES["Example 5"]["input"])
    assert e.value.code == "MISSING_IDENTIFIER" and "anonymousId" in e.value.message


def test_prepare_is_compact_msgspec_json() -> None:
    """docs/customerio-track-v2.md §6.1 L-1: op size is measured on compact UTF-8 JSON, which is what is sent."""
    data = make().prepare(EXAMPLES["Example 1"]["input"])
    assert data == json.dumps(json.loads(data), separators=(",", ":"), ensure_ascii=False).encode()


def test_prepare_does_not_change_the_call() -> None:
    """The engine may plan the same decoded call again (retries, ``gateway explain``)."""
    call = json.loads(json.dumps(EXAMPLES["Example 10"]["input"]))
    before = json.dumps(call)
    make().prepare(call)
    assert json.dumps(call) == before


# -- docs/customerio-track-v2.md §2 identifiers ---------------------------------------------------


@pytest.mark.parametrize("user_id, identifiers", [
    ("user-42", {"id": "user-42"}),
    ("12345", {"id": "12345"}),
    (12345, {"id": "12345"}),
    (2.0, {"id": "2"}),
    ("jane@example.com", {"email": "jane@example.com"}),
    ("Jane.Doe+x@Sub.Example.CO", {"email": "Jane.Doe+x@Sub.Example.CO"}),
    ("foo@localhost", {"id": "foo@localhost"}),
    ("cio_a3000001", {"cio_id": "a3000001"}),
    ("CIO_a3000001", {"id": "CIO_a3000001"}),
    ("cio_", {"id": "cio_"}),
    ("cio_jane@example.com", {"cio_id": "jane@example.com"}),
    ("jane@example.com\n", {"id": "jane@example.com\n"}),  # docs/customerio-track-v2.md §2.1: the whole string
    ("jane@exampl\u212ae.com", {"id": "jane@exampl\u212ae.com"}),  # AJV's [a-z]/i is ASCII only
    (" ", {"id": " "}),  # docs/customerio-track-v2.md §1.1 C-2: a blank id is present
])
def test_person_ref(user_id: Any, identifiers: dict[str, str]) -> None:
    """docs/customerio-track-v2.md §2.1 (ID-1 to ID-4) and §1.2 C-3, through an identify."""
    assert op_of({"type": "identify", "userId": user_id})["identifiers"] == identifiers


def test_email_detection_can_be_switched_off() -> None:
    """docs/customerio-track-v2.md §1.6 ``detect_email_user_ids`` and D-4: id-only workspaces."""
    assert op_of({"type": "identify", "userId": "jane@example.com"},
                 detect_email_user_ids=False)["identifiers"] == {"id": "jane@example.com"}


@pytest.mark.parametrize("bad", [True, {"id": 1}, ["u"]])
def test_non_scalar_identifiers_are_invalid(bad: Any) -> None:
    """docs/customerio-track-v2.md §1.2 C-3: booleans, objects and arrays used as identifiers
    → INVALID_IDENTIFIER."""
    assert code_of({"type": "identify", "userId": bad}) == "INVALID_IDENTIFIER"
    assert code_of({"type": "alias", "userId": "u", "previousId": bad}) == "INVALID_IDENTIFIER"
    assert code_of({"type": "group", "groupId": bad}) == "INVALID_IDENTIFIER"


def test_identify_falls_back_to_context_traits_email() -> None:
    """docs/customerio-track-v2.md §2.2: userId, then traits.email, then context.traits.email;
    a whitespace-only traits.email is absent (docs/customerio-track-v2.md §1.1 C-2)."""
    call = {"type": "identify", "anonymousId": "a", "traits": {"email": "  "},
            "context": {"traits": {"email": "ctx@example.com"}}}
    op = op_of(call)
    assert op["identifiers"] == {"email": "ctx@example.com"}
    assert op["attributes"] == {"email": "  ", "anonymous_id": "a"}


def test_track_identifier_order() -> None:
    """docs/customerio-track-v2.md §2.2 and D-4: userId, then anonymousId, then context.traits.email."""
    ctx = {"traits": {"email": "e@x.io"}}
    base = {"type": "track", "event": "E", "context": ctx}
    assert op_of({**base, "userId": "u", "anonymousId": "a"})["identifiers"] == {"id": "u"}
    assert op_of({**base, "anonymousId": "a"})["identifiers"] == {"anonymous_id": "a"}
    assert op_of(base)["identifiers"] == {"email": "e@x.io"}
    assert code_of({"type": "track", "event": "E"}) == "MISSING_IDENTIFIER"


def test_anonymous_id_attribute() -> None:
    """docs/customerio-track-v2.md §2.3 (ID-5, ID-6): anonymousId overwrites the same key in
    properties, is not added when it is the identifier, and never reaches object ops."""
    op = op_of({"type": "track", "event": "E", "userId": "u", "anonymousId": "real",
                "properties": {"anonymous_id": "stale"}})
    assert op["attributes"] == {"anonymous_id": "real"}
    assert "attributes" not in op_of({"type": "page", "anonymousId": "a", "name": "Home"})
    group = op_of({"type": "group", "groupId": "g", "userId": "u", "anonymousId": "a", "traits": {"name": "G"}})
    assert group["attributes"] == {"name": "G"}


# -- docs/customerio-track-v2.md §3 routing and §4 the ops ---------------------------------------


def test_semantic_names_match_exactly() -> None:
    """docs/customerio-track-v2.md §3: event names match case-sensitively; anything else is a generic event (R2)."""
    op = op_of({"type": "track", "event": "user deleted", "userId": "u"})
    assert (op["type"], op["action"], op["name"]) == ("person", "event", "user deleted")


def test_page_name_falls_back_to_name_and_has_no_length_limit() -> None:
    """docs/customerio-track-v2.md §4.3 and D-17: properties.url first, then name; no 100-byte cap."""
    long_url = "https://example.com/" + "p" * 200
    assert op_of({"type": "page", "userId": "u", "name": "Home"})["name"] == "Home"
    assert op_of({"type": "page", "userId": "u", "name": "Home", "properties": {"url": long_url}})["name"] == long_url
    assert op_of({"type": "page", "userId": "u", "name": "Home", "properties": {"url": "  "}})["name"] == "Home"


def test_screen_name_falls_back_to_properties_name() -> None:
    """docs/customerio-track-v2.md §4.4: top-level name, otherwise properties.name; the raw name (D-7)."""
    assert op_of({"type": "screen", "userId": "u", "properties": {"name": "Feed"}})["name"] == "Feed"
    assert op_of({"type": "screen", "userId": "u", "name": "Home", "properties": {"name": "Feed"}})["name"] == "Home"


def test_missing_event_name_comes_before_identifiers() -> None:
    """docs/customerio-track-v2.md §3: a track call is routed by its event name first (Edge 7 has
    no identifier either); a blank name is absent (docs/customerio-track-v2.md §1.1 C-2)."""
    assert code_of({"type": "track", "event": "   ", "userId": "u"}) == "MISSING_EVENT_NAME"
    assert code_of({"type": "track", "event": 42, "userId": "u"}) == "MISSING_EVENT_NAME"


def test_identify_keeps_objectid_and_drops_reserved_traits() -> None:
    """docs/customerio-track-v2.md §4.1: createdAt/created_at move to created_at, object type ids and
    relationshipAttributes are removed, objectId and other keys stay."""
    op = op_of({"type": "identify", "userId": "u", "traits": {
        "createdAt": 1700000000, "object_type_id": "3", "objectTypeId": 2, "objectId": 7,
        "relationshipAttributes": {}, "id": "x", "_update": True}})
    assert op["attributes"] == {"objectId": 7, "id": "x", "_update": True, "created_at": 1700000000}
    assert op["cio_relationships"] == [{"identifiers": {"object_type_id": "3", "object_id": "7"}}]


def test_identify_relationship_type_id_is_validated() -> None:
    """docs/customerio-track-v2.md §4.1: identifiers, then the object_type_id format (§4.5), then limits."""
    assert code_of({"type": "identify", "userId": "u", "traits": {"objectId": "o", "objectTypeId": "x"}}) \
        == "INVALID_OBJECT_TYPE_ID"
    assert code_of({"type": "identify", "traits": {"objectId": "o", "objectTypeId": "x"}}) == "MISSING_IDENTIFIER"


@pytest.mark.parametrize("traits, call_extra, type_id", [
    ({}, {}, "1"),
    ({"object_type_id": "3", "objectTypeId": 2}, {"objectTypeId": 4}, "3"),
    ({"objectTypeId": 2.0}, {"objectTypeId": 4}, "2"),
    ({}, {"objectTypeId": 4}, "4"),
])
def test_group_object_type_id_sources(traits: dict[str, Any], call_extra: dict[str, Any], type_id: str) -> None:
    """docs/customerio-track-v2.md §4.5 and D-10: traits.object_type_id, traits.objectTypeId, root
    objectTypeId, default "1"."""
    op = op_of({"type": "group", "groupId": "g", "traits": traits, **call_extra})
    assert op["identifiers"] == {"object_type_id": type_id, "object_id": "g"}


@pytest.mark.parametrize("bad", ["0", "-1", 2.5, True, "02", " 2", "companies"])
def test_group_object_type_id_must_be_a_positive_integer(bad: Any) -> None:
    """docs/customerio-track-v2.md §4.5: ``[1-9][0-9]*`` or INVALID_OBJECT_TYPE_ID."""
    assert code_of({"type": "group", "groupId": "g", "traits": {"objectTypeId": bad}}) == "INVALID_OBJECT_TYPE_ID"


def test_group_without_a_person_has_no_relationship() -> None:
    """docs/customerio-track-v2.md §2.2 and §4.5: no userId and no anonymousId → object identify
    without cio_relationships."""
    assert op_of({"type": "group", "groupId": 42, "traits": {"plan": "pro"}}) == {
        "type": "object", "action": "identify", "identifiers": {"object_type_id": "1", "object_id": "42"},
        "attributes": {"plan": "pro"}}


def test_group_reads_relationship_traits() -> None:
    """docs/customerio-track-v2.md §4.5 and D-12: Customer.io's Pipelines docs show ``traits.relationship_traits``
    as the group call's relationship object, so it becomes relationship_attributes, not an
    object attribute.  relationshipAttributes is preferred when both are there."""
    call: dict[str, Any] = {"userId": "user123", "groupId": "group123", "type": "group", "traits": {
        "object_type_id": "1", "account_name": "Acme", "account_type": "enterprise",
        "relationship_traits": {"is_admin": True, "position": "account manager"}}}
    assert op_of(call) == {
        "type": "object", "action": "identify", "identifiers": {"object_type_id": "1", "object_id": "group123"},
        "attributes": {"account_name": "Acme", "account_type": "enterprise"},
        "cio_relationships": [{"identifiers": {"id": "user123"},
                               "relationship_attributes": {"is_admin": True, "position": "account manager"}}]}
    call["traits"]["relationshipAttributes"] = {"role": "owner"}
    assert op_of(call)["cio_relationships"][0]["relationship_attributes"] == {"role": "owner"}


def test_merge_needs_both_sides() -> None:
    """docs/customerio-track-v2.md §4.6: MISSING_MERGE_IDENTIFIER if either side is absent; no identifiers key."""
    assert code_of({"type": "alias", "previousId": "p"}) == "MISSING_MERGE_IDENTIFIER"
    assert code_of({"type": "alias", "userId": "u", "previousId": ""}) == "MISSING_MERGE_IDENTIFIER"
    assert op_of({"type": "alias", "userId": "u", "previousId": "anon-1"}) == {
        "type": "person", "action": "merge", "primary": {"id": "u"}, "secondary": {"id": "anon-1"}}


def test_device_from_properties_and_platform_errors() -> None:
    """docs/customerio-track-v2.md §4.7 and D-13: the token may come from properties.device;
    device attributes leave out ``device`` and are not timestamp-converted (D-15);
    errors come in the order MISSING_IDENTIFIER, MISSING_DEVICE_TOKEN, INVALID_DEVICE_PLATFORM."""
    call = {"type": "track", "event": "Device Created or Updated", "userId": "u",
            "timestamp": "2024-03-20T15:00:00Z",
            "properties": {"device": {"token": "tok", "type": "watchOS"}, "seen": "2024-01-01"}}
    assert op_of(call) == {"type": "person", "action": "add_device", "identifiers": {"id": "u"},
                           "device": {"token": "tok", "platform": "ios", "last_used": 1710946800,
                                      "attributes": {"seen": "2024-01-01"}}}
    bad_platform = {**call, "properties": {"device": {"token": "tok", "type": "windows"}}}
    assert code_of(bad_platform) == "INVALID_DEVICE_PLATFORM"
    assert code_of({**bad_platform, "properties": {}}) == "MISSING_DEVICE_TOKEN"
    assert code_of({**bad_platform, "userId": None}) == "MISSING_IDENTIFIER"


def test_application_events_degrade_to_generic_events() -> None:
    """R8 (docs/customerio-track-v2.md §4.7) and D-14: without userId, token or a valid platform
    Application Installed/Opened are ordinary events, so nothing is lost."""
    for props_ctx in ({"context": {"device": {"token": "t", "type": "Windows"}}},
                      {"context": {"device": {"type": "ios"}}},
                      {"context": {"device": {"token": True, "type": "ios"}}}):
        op = op_of({"type": "track", "event": "Application Installed", "userId": "u", **props_ctx})
        assert (op["action"], op["name"]) == ("event", "Application Installed")


def test_delete_device_and_uninstall() -> None:
    """R9/R10 (docs/customerio-track-v2.md §4.7): delete_device needs userId, then a token."""
    call = {"type": "track", "event": "Application Uninstalled", "userId": "u",
            "context": {"device": {"token": "t"}}, "properties": {"x": 1}, "timestamp": "2024-01-01"}
    assert op_of(call) == {"type": "person", "action": "delete_device", "identifiers": {"id": "u"},
                           "device": {"token": "t"}}
    assert code_of({**call, "userId": None, "anonymousId": "a"}) == "MISSING_IDENTIFIER"


@pytest.mark.parametrize("event, action", [("User Deleted", "delete"), ("User Suppressed", "suppress"),
                                           ("User Unsuppressed", "unsuppress")])
def test_person_semantic_ops_need_user_id(event: str, action: str) -> None:
    """docs/customerio-track-v2.md §4.8: userId only (Customer.io's schemas require it); no timestamp,
    attributes or id."""
    call = {"type": "track", "event": event, "userId": "u", "anonymousId": "a", "messageId": "m",
            "timestamp": "2024-01-01", "properties": {"p": 1}}
    assert op_of(call) == {"type": "person", "action": action, "identifiers": {"id": "u"}}
    assert code_of({**call, "userId": None}) == "MISSING_IDENTIFIER"


def test_relationship_deleted_checks_the_object_first() -> None:
    """docs/customerio-track-v2.md §4.8 R14: MISSING_OBJECT_ID before MISSING_IDENTIFIER."""
    assert code_of({"type": "track", "event": "Relationship Deleted", "anonymousId": "a",
                    "properties": {}}) == "MISSING_OBJECT_ID"


def test_delivery_event_fields() -> None:
    """docs/customerio-track-v2.md §4.9 R16: deliveryId and metric, then a v2 metric, then a token
    (properties.recipient, else context.device.token); no timestamp."""
    base = {"type": "track", "event": "Report Delivery Event", "timestamp": "2024-01-01"}
    op = op_of({**base, "properties": {"deliveryId": 7, "metric": "delivered"},
                "context": {"device": {"token": "ctx-token"}}})
    assert op == {"type": "delivery", "action": "event", "identifiers": {"id": "7"}, "name": "delivered",
                  "attributes": {"device_token": "ctx-token"}}
    assert code_of({**base, "properties": {"metric": "opened"}}) == "MISSING_DELIVERY_FIELDS"
    assert code_of({**base, "properties": {"deliveryId": "d", "metric": "opened"}}) == "MISSING_DEVICE_TOKEN"


def test_delivery_v1_fallback_body() -> None:
    """docs/customerio-track-v2.md §8, and Edge 5 with ``delivery_v1_fallback``."""
    call = {"type": "track", "event": "Report Delivery Event", "timestamp": "2024-03-20T15:00:00Z",
            "properties": {"deliveryId": "d", "metric": "clicked", "href": "https://x.io", "actionName": "buy"}}
    assert op_of(call, delivery_v1_fallback=True) == {
        "delivery_id": "d", "metric": "clicked", "timestamp": 1710946800, "href": "https://x.io",
        "metadata": {"action_name": "buy"}}
    before = int(time.time())
    no_time = op_of({**call, "timestamp": "garbage"}, delivery_v1_fallback=True)
    assert before <= no_time["timestamp"] <= time.time() + 1  # "<to_unix(timestamp) or now>"
    assert code_of({**call, "properties": {"deliveryId": "d", "metric": "clicked"}}) == "UNSUPPORTED_IN_TRACK_V2"
    assert code_of({**call, "properties": {"deliveryId": "d", "metric": "exploded"}},
                   delivery_v1_fallback=True) == "UNSUPPORTED_IN_TRACK_V2"


# -- docs/customerio-track-v2.md §4.10 event ids -----------------------------------------------


def test_event_id_modes() -> None:
    """docs/customerio-track-v2.md §4.10 (E-2, E-3): a ULID messageId is upper-cased; "message_id" sends
    it raw (as Segment's destination does); "none" sends nothing (as RudderStack's)."""
    call = {"type": "track", "event": "E", "userId": "u", "messageId": "01hs6q3z8x4m2n7p9r5t1v3w6y"}
    assert op_of(call)["id"] == "01HS6Q3Z8X4M2N7P9R5T1V3W6Y"
    assert op_of({**call, "messageId": "m-1"}, event_id_mode="message_id")["id"] == "m-1"
    assert "id" not in op_of(call, event_id_mode="none")


def test_derived_ulid_check_value_and_time_rules() -> None:
    """docs/customerio-track-v2.md §4.10 E-4: the check value; the time falls back to originalTimestamp
    and is 0 when absent, unparseable or negative."""
    assert derive_ulid("6f5f436d-8534-4070-8023-d18f8b78ed39", 1710949020250) == "01HSE84CJTJKSF4BG1Y9JCQ5JJ"
    call = {"type": "track", "event": "E", "userId": "u", "messageId": "6f5f436d-8534-4070-8023-d18f8b78ed39"}
    assert op_of({**call, "originalTimestamp": "2024-03-20T15:37:00.250Z"})["id"] == "01HSE84CJTJKSF4BG1Y9JCQ5JJ"
    zero = derive_ulid(call["messageId"], 0)
    assert zero.startswith("0000000000")
    for ts in (None, "garbage", "1969-12-31T23:59:59Z", -5, 10 ** 13):  # 10**13 s is past a ULID's 48 bits of ms
        assert op_of({**call, "timestamp": ts})["id"] == zero
    assert op_of({**call, "timestamp": 1710949020.25})["id"] == "01HSE84CJTJKSF4BG1Y9JCQ5JJ"
    assert op_of({**call, "timestamp": "1710949020.2509"})["id"] == "01HSE84CJTJKSF4BG1Y9JCQ5JJ"


# -- docs/customerio-track-v2.md §5 timestamps ---------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("2019-02-01", 1548979200),
    ("2006-01-02T15:04:05-0800", 1136243045),
    ("2006-01-02T15:04:05.007+01:00", 1136210645),
    ("2023-12-25T14:30:45Z", 1703514645),
    ("2023-12-25T14:30:45.123456789Z", 1703514645),
    ("2024-03-20T10:30:00-05:00", 1710948600),
    ("1969-12-31T23:59:59.5Z", -1),
    ("2024-02-29T12:00", 1709208000),
    ("2000-02-29", 951782400),
])
def test_strict_iso_check_values(text: str, seconds: int) -> None:
    """docs/customerio-track-v2.md §5.3: its check values and rules."""
    parsed = parse_iso_unix(text)
    assert parsed is not None and parsed[0] == seconds


@pytest.mark.parametrize("text", [
    "2023-02-30", "2023-13-25", "2023-12-25T25:30:45", "2023-12-25T14:60", "2023-12-25T14:30:60Z",
    "2023-12-25 14:30:45", "2023-12-25t14:30:45Z", "2023-12-25T14:30:45z", "2023-12-25T14:30:45.1234567890Z",
    "2023-12-25T14:30.5Z", "2023-12-25Z", "2023-12-25T14:30:45+24:00", "2023-12-25T14:30:45+01:60",
    "2100-02-29", "2023-12-25T14:30:45\n", "\uff12023-12-25", "25 Mar 2015", "1700000000", "2024-1-01",
])
def test_not_strict_iso(text: str) -> None:
    """docs/customerio-track-v2.md §5.3: upper-case T/Z, no space, ≤ 9 fraction digits only after seconds,
    an offset only with a time, a real calendar date and time."""
    assert parse_iso_unix(text) is None


@pytest.mark.parametrize("value, expected", [
    (1710948600.9, 1710948600), (-0.5, -1), (1710948600, 1710948600), ("1710948600", 1710948600),
    ("1710948600.99", 1710948600), ("2024-03-20T10:30:00-05:00", 1710948600),
    ("garbage", None), ("", None), (True, None), (None, None), ({"t": 1}, None), ("1e9", None), ("-5", None),
])
def test_to_unix(value: Any, expected: int | None) -> None:
    """docs/customerio-track-v2.md §5.1 (T-1 to T-3): numbers floored, digit strings floored, strict ISO,
    otherwise omitted."""
    assert to_unix(value) == expected


def test_attribute_conversion() -> None:
    """docs/customerio-track-v2.md §5.2 (T-5 to T-7): plain objects recursively; arrays are not entered;
    non-ISO strings (T-7's list) and other values stay."""
    attrs: dict[str, Any] = {
        "a": "2024-01-01", "nested": {"b": "2024-01-01T00:00:00Z", "deeper": {"c": "2024-01-01"}},
        "list": ["2024-01-01", {"at": "2024-01-01T00:00:00Z"}],
        "keep": ["1700000000", "25 Mar 2015", "03/19/2024", "2018-03-04T12:08:56 PDT", "11-Jan-18"],
        "n": 1, "t": True, "z": None}
    out = convert_timestamps(attrs)
    assert out["a"] == 1704067200 and out["nested"] == {"b": 1704067200, "deeper": {"c": 1704067200}}
    assert out["list"] == attrs["list"] and out["keep"] == attrs["keep"]
    assert [out["n"], out["t"], out["z"]] == [1, True, None]
    for s in attrs["keep"]:
        assert convert_timestamps({"k": s}) == {"k": s}


def test_convert_timestamps_off() -> None:
    """docs/customerio-track-v2.md §5.1 T-4: attributes stay as sent, but top-level timestamps (and
    device.last_used, D-21) are still integers because Customer.io requires them."""
    call = {"type": "identify", "userId": "u", "timestamp": "2024-03-20T10:30:00-05:00",
            "traits": {"seen": "2024-01-01", "created_at": "2024-01-01"}}
    assert op_of(call, convert_timestamps=False) == {
        "type": "person", "action": "identify", "identifiers": {"id": "u"}, "timestamp": 1710948600,
        "attributes": {"seen": "2024-01-01", "created_at": "2024-01-01"}}
    device = op_of({"type": "track", "event": "Device Created or Updated", "userId": "u",
                    "timestamp": "2024-03-20T10:30:00-05:00", "context": {"device": {"token": "t", "type": "ios"}}},
                   convert_timestamps=False)
    assert device["device"]["last_used"] == 1710948600


def test_names_and_ids_are_never_converted() -> None:
    """docs/customerio-track-v2.md §5.2: top-level fields such as name or id are not timestamps."""
    op = op_of({"type": "track", "event": "2024-01-01", "userId": "2024-01-01"})
    assert op["name"] == "2024-01-01" and op["identifiers"] == {"id": "2024-01-01"}


def test_timestamp_falls_back_to_original_timestamp() -> None:
    """docs/customerio-track-v2.md §5.1: timestamp, falling back to originalTimestamp."""
    op = op_of({"type": "track", "event": "E", "userId": "u", "originalTimestamp": "2019-02-01"})
    assert op["timestamp"] == 1548979200


# -- docs/customerio-track-v2.md §6.1 limits -----------------------------------------------------


def test_attribute_limits() -> None:
    """docs/customerio-track-v2.md §6.1 L-5: ≤ 300 attributes, names ≤ 150 bytes, values ≤ 1000 bytes
    (UTF-8 for strings, compact JSON for objects and arrays; numbers exempt)."""
    ok = {"type": "identify", "userId": "u", "traits": {f"k{i}": i for i in range(300)}}
    make().prepare(ok)
    assert code_of({**ok, "traits": {f"k{i}": i for i in range(301)}}) == "LIMIT_EXCEEDED"
    make().prepare({**ok, "traits": {"n" * 150: 1, "v": "é" * 500, "big": 1e308}})
    assert code_of({**ok, "traits": {"n" * 151: 1}}) == "LIMIT_EXCEEDED"
    assert code_of({**ok, "traits": {"v": "é" * 501}}) == "LIMIT_EXCEEDED"
    assert code_of({**ok, "traits": {"v": {"list": ["x" * 990]}}}) == "LIMIT_EXCEEDED"
    make().prepare({**ok, "traits": {"v": ["x" * 996]}})  # ["…"]: 996 + 4 = 1000 bytes
    assert code_of({**ok, "traits": {"v": ["x" * 997]}}) == "LIMIT_EXCEEDED"


def test_limits_apply_to_objects_and_relationships_but_not_event_data() -> None:
    """docs/customerio-track-v2.md §6.1: object ids and relationship attributes are limited; event
    attributes only by the op size (L-1)."""
    assert code_of({"type": "group", "groupId": "g" * 151}) == "LIMIT_EXCEEDED"
    assert code_of({"type": "group", "groupId": "g", "userId": "u" * 151}) == "LIMIT_EXCEEDED"
    assert code_of({"type": "group", "groupId": "g", "userId": "u",
                    "traits": {"relationshipAttributes": {"r": "x" * 1001}}}) == "LIMIT_EXCEEDED"
    assert code_of({"type": "identify", "userId": "u",
                    "traits": {"objectId": "o" * 151}}) == "LIMIT_EXCEEDED"
    make().prepare({"type": "track", "event": "E", "userId": "u", "properties": {"v": "x" * 5000}})
    make().prepare({"type": "identify", "userId": "jane" * 40 + "@example.com"})  # an email is not an id


def test_op_size_limit() -> None:
    """docs/customerio-track-v2.md §6.1 L-1: an op over 32,000 bytes of compact UTF-8 JSON is
    LIMIT_EXCEEDED, never truncated."""
    base = {"type": "track", "event": "E", "userId": "u"}
    skeleton = len(make().prepare({**base, "properties": {"v": ""}}))
    assert len(make().prepare({**base, "properties": {"v": "x" * (32_000 - skeleton)}})) == 32_000
    assert code_of({**base, "properties": {"v": "x" * (32_001 - skeleton)}}) == "LIMIT_EXCEEDED"
    # multi-byte characters count as their UTF-8 bytes
    assert code_of({**base, "properties": {"v": "é" * (16_001 - skeleton // 2)}}) == "LIMIT_EXCEEDED"


def test_event_name_limit_counts_bytes() -> None:
    """docs/customerio-track-v2.md §4.2 and L-4: ≤ 100 UTF-8 bytes; not applied to page and screen names (D-17)."""
    make().prepare({"type": "track", "event": "é" * 50, "userId": "u"})
    assert code_of({"type": "track", "event": "é" * 50 + "x", "userId": "u"}) == "LIMIT_EXCEEDED"
    make().prepare({"type": "screen", "name": "s" * 300, "userId": "u"})


def test_limit_check_order() -> None:
    """docs/customerio-track-v2.md §6.1: identifier lengths before attribute checks."""
    with pytest.raises(MappingError) as e:
        make().prepare({"type": "identify", "userId": "u" * 151, "traits": {"bio": "x" * 1001}})
    assert e.value.code == "LIMIT_EXCEEDED" and "identifiers.id" in e.value.message


# -- settings and registration ------------------------------------------------------------------


def test_settings_and_urls() -> None:
    """docs/customerio-apis.md §2 (H-1, H-3) and §3 AU-1: US and EU hosts, region
    case-insensitive, ``endpoint`` overrides both; Basic SITE_ID:API_KEY."""
    assert make().batch_url == "https://track.customer.io/api/v2/batch"
    assert make(region="EU").batch_url == "https://track-eu.customer.io/api/v2/batch"
    assert make(region="eu", endpoint="http://127.0.0.1:9/").batch_url == "http://127.0.0.1:9/api/v2/batch"
    assert make(site_id=123456).headers["Authorization"] == \
        "Basic " + base64.b64encode(f"123456:{TRACK_API_KEY}".encode()).decode()


@pytest.mark.parametrize("settings, field", [
    ({"site_id": "s"}, "api_key"),
    ({"site_id": "s", "api_key": "k", "regoin": "us"}, "regoin"),
    ({"site_id": "s", "api_key": "k", "region": "ap"}, "region"),
    ({"site_id": "s", "api_key": "k", "event_id_mode": "uuid"}, "event_id_mode"),
    ({"site_id": "s", "api_key": "k", "max_ops_per_batch": 1001}, "max_ops_per_batch"),
    ({"site_id": "", "api_key": "k"}, "site_id"),
])
def test_settings_errors_name_the_field(settings: dict[str, Any], field: str) -> None:
    """docs/plugins.md: a plugin's settings are a Struct with forbid_unknown_fields, so errors
    name the field."""
    with pytest.raises(ConfigError) as e:
        to_struct(settings, Track.Settings)
    assert field in str(e.value)


def test_limits() -> None:
    """docs/customerio-track-v2.md §6.1 and §6.2 B-2: 32,000-byte ops, 500,000-byte bodies,
    max_ops_per_batch (default 100, cap 1000), 1000 requests/s; the engine reads
    ``limits`` from the instance."""
    assert Track.limits == Limits(max_batch_calls=100, max_batch_bytes=500_000, max_call_bytes=32_000,
                                  batch_overhead=len(b'{"batch":[]}'), rate_requests=1000.0, rate_period=1.0)
    assert make(max_ops_per_batch=1000).limits.max_batch_calls == 1000
    assert Track.limits.max_batch_calls == 100
    d = make()
    payloads = [d.prepare(EXAMPLES[f"Example {i}"]["input"]) for i in (1, 6)]
    body = d.batch_body(payloads)
    assert json.loads(body) == {"batch": [json.loads(p) for p in payloads]}
    assert len(body) == d.limits.batch_overhead + sum(map(len, payloads)) + len(payloads) - 1


def test_registered_as_a_builtin_plugin() -> None:
    """The core loads plugins.customerio_track and finds the type by its name."""
    assert build_registry(make_manager()).destinations["customerio_track"] is Track


# -- the fake itself refuses what Customer.io documents as invalid ---------------------------------

_GOOD_EVENT = {"type": "person", "action": "event", "identifiers": {"id": "u"}, "name": "E"}


@pytest.mark.parametrize("op, field", [
    ({**_GOOD_EVENT, "identifiers": {"id": "u", "email": "e@x.io"}}, "identifiers"),  # "cannot pass multiple"
    ({**_GOOD_EVENT, "identifiers": {"id": ""}}, "identifiers.id"),
    ({**_GOOD_EVENT, "identifiers": {"id": "u" * 151}}, "identifiers.id"),  # ID 150 bytes
    ({**_GOOD_EVENT, "name": "x" * 101}, "name"),  # Event Name 100 bytes
    ({**_GOOD_EVENT, "timestamp": 1.5}, "timestamp"),  # integer
    ({**_GOOD_EVENT, "id": "m-1"}, "id"),  # dedupe_id: a ULID
    ({**_GOOD_EVENT, "data": {}}, "data"),  # not part of the schema
    ({k: v for k, v in _GOOD_EVENT.items() if k != "name"}, "name"),
    # docs/customerio-track-v2.md D-2: identify needs a real identifier
    ({"type": "person", "action": "identify", "identifiers": {"anonymous_id": "a"}}, "identifiers"),
    ({"type": "person", "action": "merge", "primary": {"id": "a"}, "secondary": {"id": "b"},
      "identifiers": {"id": "a"}}, "identifiers"),
    ({"type": "person", "action": "add_device", "identifiers": {"id": "u"},
      "device": {"token": "t", "platform": "windows"}}, "device.platform"),
    ({"type": "object", "action": "identify", "identifiers": {"object_type_id": 1, "object_id": "o"}},
     "identifiers.object_type_id"),
    ({"type": "object", "action": "identify", "identifiers": {"object_type_id": "1", "object_id": "o"},
      "cio_relationships": [{"identifiers": {"anonymous_id": "a"}}]}, "cio_relationships[0].identifiers"),
    ({"type": "delivery", "action": "event", "identifiers": {"id": "d"}, "name": "clicked",
      "attributes": {"device_token": "t"}}, "name"),
    ({"type": "person", "action": "fly", "identifiers": {"id": "u"}}, "action"),
    ({"type": "people", "action": "identify", "identifiers": {"id": "u"}}, "type"),
    ({"type": "person", "action": "identify", "identifiers": {"id": "u"}, "attributes": {"a": "x" * 1001}},
     "attributes.a"),
])
def test_the_fake_refuses_invalid_ops(op: dict[str, Any], field: str) -> None:
    """tests/fake_customerio.py is only worth its passes if it refuses what Customer.io
    refuses: its op schemas and the limits of docs/customerio-apis.md §5 (SZ-4)."""
    with pytest.raises(Invalid) as e:
        validate_track_op(op)
    assert e.value.field == field


async def test_the_fake_refuses_bad_requests(cio: FakeCustomerIO, http: HttpClient) -> None:
    """Wrong credentials → 401; a body that is not ``{"batch": [...]}`` → 400; over 500,000
    bytes → 413; an unknown path → 404 (docs/customerio-apis.md §3, §5 and §7.1)."""
    auth = make().headers["Authorization"]
    cases: list[tuple[str, dict[str, str], bytes, int]] = [
        ("/api/v2/batch", {}, b'{"batch":[]}', 401),
        ("/api/v2/batch", {"Authorization": "Basic " + base64.b64encode(b"fake-site-id:nope").decode()},
         b'{"batch":[]}', 401),
        ("/api/v2/batch", {"Authorization": auth}, json.dumps([_GOOD_EVENT]).encode(), 400),
        ("/api/v2/batch", {"Authorization": auth}, b'{"batch":[]}', 400),
        ("/api/v2/batch", {"Authorization": auth}, b'{"batch":[' + b" " * 500_000 + b"]}", 413),
        ("/api/v2/batches", {"Authorization": auth}, json.dumps({"batch": [_GOOD_EVENT]}).encode(), 404),
        ("/api/v2/batch", {"Authorization": auth}, json.dumps({"batch": [_GOOD_EVENT]}).encode(), 200),
    ]
    for path, headers, body, status in cases:
        async with http.post(cio.url + path, data=body,
                             headers={"Content-Type": "application/json", **headers}) as r:
            assert r.status == status, (path, body[:40])
    assert cio.track_ops == [_GOOD_EVENT]


# -- sending, against the fake: docs/customerio-apis.md §7 ---------------------------------


def ops(*names: str) -> list[dict[str, Any]]:
    return [EXAMPLES[n]["expected"] for n in names]


async def test_send_posts_the_documented_request(cio: FakeCustomerIO, http: HttpClient) -> None:
    """docs/customerio-apis.md §2-§4: POST /api/v2/batch, Basic base64(site_id:api_key), JSON,
    ``{"batch":[op,…]}``, even for one op (H-4); 200 {} means every op is delivered
    (docs/customerio-apis.md §7.1)."""
    d = make(http, endpoint=cio.url)
    names = ("Example 2", "Example 8", "Example 10", "Example 12", "Example 20")
    payloads = [d.prepare(EXAMPLES[n]["input"]) for n in names]
    assert await d.send(payloads) == [DELIVERED] * 5
    assert await d.send(payloads[:1]) == [DELIVERED]
    [req, single] = cio.requests
    assert (req.method, req.path, req.status) == ("POST", "/api/v2/batch", 200)
    assert req.headers["Authorization"] == "Basic " + base64.b64encode(f"{SITE_ID}:{TRACK_API_KEY}".encode()).decode()
    assert req.headers["Content-Type"] == "application/json"
    assert req.json == {"batch": ops(*names)}
    assert single.json == {"batch": ops("Example 2")}
    assert cio.track_ops == ops(*names) + ops("Example 2")


async def test_every_example_is_accepted_by_the_fake(cio: FakeCustomerIO, http: HttpClient) -> None:
    """Every op docs/customerio-track-v2.md §10 expects passes the fake's documented schemas
    in one batch (docs/customerio-track-v2.md §6.2 B-2: types mix)."""
    d = make(http, endpoint=cio.url)
    good = [e for e in DATA["examples"] + DATA["edge_fixtures"] if "expected" in e]
    assert await d.send([d.prepare(e["input"]) for e in good]) == [DELIVERED] * len(good)
    assert cio.track_ops == [e["expected"] for e in good]


WORKED_ANSWER = {"errors": [{"batch_index": 1, "reason": "invalid", "field": "identifiers",
                           "message": "identifier is not valid"}]}


@pytest.mark.parametrize("status", [207, 200])
async def test_worked_response_example(cio: FakeCustomerIO, http: HttpClient, status: int) -> None:
    """docs/customerio-track-v2.md §7, the worked answer: Examples 6, 7 and 13 in one
    request; the 207 (or a 200 with the same body, docs/customerio-apis.md §7.2 IE-1) fails
    event 2 permanently with its message and field, and delivers events 1 and 3."""
    d = make(http, endpoint=cio.url)
    cio.item_errors("track", WORKED_ANSWER["errors"], status=status)
    out = await d.send([d.prepare(EXAMPLES[n]["input"]) for n in ("Example 6", "Example 7", "Example 13")])
    assert out[0] == DELIVERED and out[2] == DELIVERED
    assert isinstance(out[1], Failed) and out[1].status == status
    assert "identifier is not valid" in out[1].reason and "identifiers" in out[1].reason
    assert json.loads(out[1].body) == WORKED_ANSWER["errors"][0]
    assert len(cio.requests) == 1  # permanent: not retried, not bisected
    assert cio.track_ops == ops("Example 6", "Example 13")


@pytest.mark.parametrize("body", [b'{"errors":[]}', b"{}", b"", b"not json",
                                  b'{"errors":[{"batch_index":5},{"batch_index":-1},{"batch_index":"1"},'
                                  b'{"batch_index":true},{"message":"no index"}]}'])
async def test_200_without_valid_item_errors_delivers_all(cio: FakeCustomerIO, http: HttpClient,
                                                          body: bytes) -> None:
    """docs/customerio-apis.md §7.2 IE-3: 200 with no errors (or errors without a valid
    batch_index, which are logged and ignored) delivers every op (docs/customerio-track-v2.md §7)."""
    d = make(http, endpoint=cio.url)
    cio.fail("track", 200, body=body)
    payloads = [d.prepare(EXAMPLES[n]["input"]) for n in ("Example 6", "Example 7")]
    assert await d.send(payloads) == [DELIVERED, DELIVERED]


async def test_fake_validation_errors_come_back_per_item(cio: FakeCustomerIO, http: HttpClient) -> None:
    """docs/customerio-apis.md §7.2 without injection: an op that breaks the documented
    schema (a string timestamp) is a 207 item error from the fake; only that op fails."""
    d = make(http, endpoint=cio.url)
    good = d.prepare(EXAMPLES["Example 6"]["input"])
    bad = json.dumps({**EXAMPLES["Example 6"]["expected"], "timestamp": "2024-03-20"}).encode()
    out = await d.send([good, bad, good])
    assert out[0] == DELIVERED == out[2]
    assert isinstance(out[1], Failed) and out[1].status == 207 and "timestamp" in out[1].reason
    assert len(cio.track_ops) == 2


async def test_400_is_bisected_to_the_bad_ops(cio: FakeCustomerIO, http: HttpClient) -> None:
    """docs/customerio-apis.md §7.1: a 400 accepts nothing; with several ops the batch is split in half and
    resent until the bad ops are isolated (at most ⌈log₂ n⌉ levels); good ops are delivered
    in their order."""
    d = make(http, endpoint=cio.url)
    calls = [{"type": "track", "event": "E", "userId": f"u{i}"} for i in range(8)]
    cio.poison["track"] = lambda op: op.get("identifiers", {}).get("id") in ("u2", "u7")
    out = await d.send([d.prepare(c) for c in calls])
    for i, oc in enumerate(out):
        if i in (2, 7):
            assert isinstance(oc, Failed) and oc.status == 400
        else:
            assert oc == DELIVERED
    assert [op["identifiers"]["id"] for op in cio.track_ops] == ["u0", "u1", "u3", "u4", "u5", "u6"]
    sizes = [len(r.json["batch"]) for r in cio.requests]
    assert sizes[0] == 8 and len(sizes) <= 2 * 8 - 1
    isolated = [r.json["batch"][0]["identifiers"]["id"] for r in cio.requests if r.status == 400 and
                len(r.json["batch"]) == 1]
    assert isolated == ["u2", "u7"]


async def test_400_for_a_single_op_fails_it(cio: FakeCustomerIO, http: HttpClient) -> None:
    """docs/customerio-apis.md §7.1: a 400 for one op fails it permanently."""
    d = make(http, endpoint=cio.url)
    cio.fail("track", 400, body={"errors": [{"reason": "bad", "field": "batch", "message": "malformed"}]})
    [out] = await d.send([d.prepare(EXAMPLES["Example 6"]["input"])])
    assert isinstance(out, Failed) and out.status == 400 and "malformed" in out.body
    assert len(cio.requests) == 1


async def test_413_halves_until_it_fits(cio: FakeCustomerIO, http: HttpClient) -> None:
    """docs/customerio-apis.md §7.1: a 413 accepts nothing; n > 1 is split in half and resent; one op that is
    still too large fails with LIMIT_EXCEEDED."""
    d = make(http, endpoint=cio.url)
    payloads = [d.prepare({"type": "track", "event": "E", "userId": f"u{i}", "properties": {"v": "x" * 900}})
                for i in range(6)]
    cio.max_body["track"] = 2 * len(payloads[0]) + 20
    assert await d.send(payloads) == [DELIVERED] * 6
    assert [op["identifiers"]["id"] for op in cio.track_ops] == [f"u{i}" for i in range(6)]
    assert all(len(r.json["batch"]) <= 2 for r in cio.requests if r.status == 200)
    cio.max_body["track"] = 100
    [out] = await d.send(payloads[:1])
    assert isinstance(out, Failed) and out.status == 413 and out.reason.startswith("LIMIT_EXCEEDED")


async def test_bad_credentials_pause(cio: FakeCustomerIO, http: HttpClient) -> None:
    """docs/customerio-apis.md §7.3: 401 (wrong key), 403 and 404 (wrong host or path) stop the
    destination until a person acts: ``Paused``, so the engine keeps the batch queued."""
    payload = make().prepare(EXAMPLES["Example 6"]["input"])
    with pytest.raises(Paused) as e:
        await make(http, endpoint=cio.url, api_key="wrong").send([payload])
    assert e.value.status == 401
    cio.fail("track", 403)
    with pytest.raises(Paused) as e:
        await make(http, endpoint=cio.url).send([payload, payload])
    assert e.value.status == 403
    with pytest.raises(Paused) as e:
        await make(http, endpoint=cio.url + "/eu").send([payload])
    assert e.value.status == 404 and "region" in e.value.reason
    assert cio.track_ops == []
    assert [r.status for r in cio.requests] == [401, 403, 404]


async def test_429_retries_with_retry_after(cio: FakeCustomerIO, http: HttpClient) -> None:
    """docs/customerio-apis.md §7.1: a 429 retries the whole request, honouring Retry-After in seconds
    or as an HTTP-date."""
    d = make(http, endpoint=cio.url)
    payloads = [d.prepare(EXAMPLES[n]["input"]) for n in ("Example 6", "Example 7")]
    cio.fail("track", 429, headers={"Retry-After": "7"})
    out = await d.send(payloads)
    assert out == [Retry("HTTP 429", 429, out[0].body, 7.0)] * 2  # type: ignore[union-attr]
    cio.fail("track", 429, headers={"Retry-After": email.utils.formatdate(time.time() + 30, usegmt=True)})
    out = await d.send(payloads)
    assert isinstance(out[0], Retry) and 25 <= (out[0].retry_after or 0) <= 31
    assert cio.track_ops == []


@pytest.mark.parametrize("status", [500, 502, 503, 408])
async def test_5xx_and_408_retry_then_deliver(cio: FakeCustomerIO, http: HttpClient, status: int) -> None:
    """docs/customerio-apis.md §7.1: the whole request is retried (the engine does the backoff)."""
    d = make(http, endpoint=cio.url)
    payloads = [d.prepare(EXAMPLES[n]["input"]) for n in ("Example 6", "Example 7")]
    cio.fail("track", status, times=2)
    for _ in range(2):
        out = await d.send(payloads)
        assert all(isinstance(o, Retry) and o.status == status for o in out)
    assert await d.send(payloads) == [DELIVERED, DELIVERED]
    assert cio.track_ops == ops("Example 6", "Example 7")


async def test_other_4xx_fail_every_op(cio: FakeCustomerIO, http: HttpClient) -> None:
    """docs/customerio-apis.md §7.1: any other 4xx is permanent for all ops in the request."""
    d = make(http, endpoint=cio.url)
    cio.fail("track", 422)
    out = await d.send([d.prepare(EXAMPLES["Example 6"]["input"])] * 2)
    assert all(isinstance(o, Failed) and o.status == 422 for o in out)
    assert len(cio.requests) == 1


async def test_network_errors_propagate(http: HttpClient) -> None:
    """docs/customerio-apis.md §7.1: a network error retries the whole request, which the engine does
    when ``send`` raises aiohttp.ClientError (docs/plugins.md, ``send``)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = make(http, endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(aiohttp.ClientError):
        await d.send([d.prepare(EXAMPLES["Example 6"]["input"])])


def _identify(user: str) -> dict[str, Any]:
    return {"type": "identify", "userId": user, "traits": {"plan": "pro"}}


async def test_merge_never_shares_a_request_with_its_primarys_identify(cio: FakeCustomerIO,
                                                                       http: HttpClient) -> None:
    """docs/customerio-track-v2.md §6.2 B-3 and §4.6: a merge is sent in a later request than an identify
    of its primary (and before one that follows it); other ops keep sharing requests."""
    d = make(http, endpoint=cio.url)
    merge = {"type": "alias", "userId": "jane@example.com", "previousId": "anon-1"}
    calls = [_identify("jane@example.com"), _identify("bob"), merge, _identify("carl"),
             _identify("jane@example.com")]
    assert await d.send([d.prepare(c) for c in calls]) == [DELIVERED] * 5
    batches = [[(op["action"], op.get("identifiers") or op["primary"]) for op in r.json["batch"]]
               for r in cio.requests]
    jane = {"email": "jane@example.com"}
    assert batches == [[("identify", jane), ("identify", {"id": "bob"})],
                       [("merge", jane), ("identify", {"id": "carl"})],
                       [("identify", jane)]]
    cio.requests.clear()
    assert await d.send([d.prepare(_identify("bob")), d.prepare(merge)]) == [DELIVERED] * 2
    assert len(cio.requests) == 1


async def test_merge_is_held_back_when_the_identify_before_it_fails(cio: FakeCustomerIO,
                                                                    http: HttpClient) -> None:
    """docs/customerio-track-v2.md §6.2 B-4: the primary must exist; if its identify must be retried, the merge is
    not sent ahead of it but retried with it, in order."""
    d = make(http, endpoint=cio.url)
    cio.fail("track", 503)
    out = await d.send([d.prepare(_identify("u1")), d.prepare({"type": "alias", "userId": "u1", "previousId": "p"})])
    assert all(isinstance(o, Retry) and o.status == 503 for o in out)
    assert len(cio.requests) == 1 and cio.track_ops == []


async def test_v1_fallback_is_sent_to_metrics(cio: FakeCustomerIO, http: HttpClient) -> None:
    """docs/customerio-track-v2.md §8 and docs/customerio-apis.md §9: a metric v2 cannot
    carry goes alone to /api/v1/metrics with the same Basic auth; v2 ops in the same batch
    still go to /api/v2/batch; outcomes keep order."""
    d = make(http, endpoint=cio.url, delivery_v1_fallback=True)
    clicked = {"type": "track", "event": "Report Delivery Event", "timestamp": "2024-03-20T15:00:00Z",
               "properties": {"deliveryId": "d1", "metric": "clicked", "recipient": "jane@example.com"}}
    payloads = [d.prepare(EXAMPLES["Example 6"]["input"]), d.prepare(clicked),
                d.prepare(EXAMPLES["Example 20"]["input"])]
    assert await d.send(payloads) == [DELIVERED] * 3
    assert cio.metrics == [{"delivery_id": "d1", "metric": "clicked", "timestamp": 1710946800,
                            "recipient": "jane@example.com"}]
    assert cio.track_ops == ops("Example 6", "Example 20")
    cio.fail("metrics", 500)
    out = await d.send(payloads[1:2])
    assert isinstance(out[0], Retry) and out[0].status == 500
    with pytest.raises(Paused):
        await make(http, endpoint=cio.url, delivery_v1_fallback=True, api_key="bad").send(payloads[1:2])


# -- end to end: the real gateway app ------------------------------------------------------------


def track_destination(cio: FakeCustomerIO, max_attempts: int = 3) -> str:
    """config.yaml's destinations with the Track destination pointed at the fake, fast retries."""
    return f"""
        destinations:
          - name: Customer.io
            type: customerio_track
            settings: {{site_id: {SITE_ID}, api_key: {TRACK_API_KEY}, endpoint: "{cio.url}"}}
            retry: {{backoff_base: 0.01, backoff_cap: 0.05, max_attempts: {max_attempts}}}
        """


async def dead_letters(path: Path, n: int, timeout: float = 10.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        store = open_dead_letters(StorageConfig(path=str(path)))
        try:
            letters = store.list()
        finally:
            store.close()
        if len(letters) >= n or time.monotonic() > deadline:
            return letters
        await asyncio.sleep(0.05)


async def test_e2e_calls_reach_the_fake_as_track_ops(gateway_client: Callable[..., Any], cio: FakeCustomerIO,
                                                      tmp_path: Path) -> None:
    """Calls posted to the gateway are stored, mapped by the Track destination and
    delivered to (fake) Customer.io as docs/customerio-track-v2.md §10 expects; a call that cannot
    be mapped (Example 5) is dead-lettered with its code, and the others still go."""
    client = await gateway_client(track_destination(cio))
    names = ["Example 6", "Example 5", "Example 13", "Example 10", "Example 12", "Example 3"]
    r = await client.post("/v1/batch", json={"batch": [EXAMPLES[n]["input"] for n in names]},
                          headers={"Authorization": f"Bearer {WRITE_KEY}"})
    assert r.status == 200
    await cio.wait_for(lambda: len(cio.track_ops) >= 5)
    assert cio.track_ops == ops("Example 6", "Example 13", "Example 10", "Example 12", "Example 3")
    [letter] = await dead_letters(tmp_path / "spool", 1)
    assert (letter.destination, letter.message_id) == ("Customer.io", "m-0005")
    assert letter.reason.startswith("MISSING_IDENTIFIER")


async def test_e2e_item_error_is_dead_lettered_alone(gateway_client: Callable[..., Any], cio: FakeCustomerIO,
                                                    tmp_path: Path) -> None:
    """A Track v2 answer can fail single items of a batch: only those are dead-lettered
    (docs/customerio-apis.md §7.2), with the worked answer of docs/customerio-track-v2.md §7."""
    client = await gateway_client(track_destination(cio))
    cio.item_errors("track", WORKED_ANSWER["errors"])
    names = ["Example 6", "Example 7", "Example 13"]
    r = await client.post("/v1/batch", json={"batch": [EXAMPLES[n]["input"] for n in names]},
                          headers={"Authorization": f"Bearer {WRITE_KEY}"})
    assert r.status == 200
    await cio.wait_for(lambda: len(cio.track_ops) >= 2)
    [letter] = await dead_letters(tmp_path / "spool", 1)
    assert letter.message_id == "6f5f436d-8534-4070-8023-d18f8b78ed39" and letter.status == 207
    assert "identifier is not valid" in letter.reason
    assert [len(r.json["batch"]) for r in cio.track_requests] == [3]
    assert cio.track_ops == ops("Example 6", "Example 13")


async def test_e2e_server_errors_are_retried(gateway_client: Callable[..., Any], cio: FakeCustomerIO,
                                            tmp_path: Path) -> None:
    """docs/customerio-apis.md §7.1 with the engine's backoff: two 503s, then every call arrives once."""
    client = await gateway_client(track_destination(cio, max_attempts=5))
    cio.fail("track", 503, times=2)
    names = ["Example 6", "Example 7"]
    r = await client.post("/v1/batch", json={"batch": [EXAMPLES[n]["input"] for n in names]},
                          headers={"Authorization": f"Bearer {WRITE_KEY}"})
    assert r.status == 200
    await cio.wait_for(lambda: len(cio.track_ops) >= 2)
    assert sorted(map(json.dumps, cio.track_ops)) == sorted(map(json.dumps, ops(*names)))
    assert [r.status for r in cio.track_requests][:2] == [503, 503]
    assert await dead_letters(tmp_path / "spool", 0) == []
