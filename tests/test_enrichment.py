"""What the gateway adds to, and removes from, every call before it is stored
(README.md, "The path of an event": enrich (messageId, receivedAt, timestamp,
context.ip, batch context)).

The timestamps follow docs/pipelines-api.md ("Timestamps":
timestamp, receivedAt, sentAt, originalTimestamp) and
docs/pipelines-api.md (sentAt: "when a library sends an event";
originalTimestamp: "the timestamp on the client device"): the client's clock
is corrected by the skew between its sentAt and our receivedAt,
``timestamp = receivedAt - (sentAt - originalTimestamp)``.

Most tests call ``Ingest.prepare(..., now=...)`` for exact values; a few go
through HTTP to the spool file.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import msgspec
import pytest

from gateway import config as config_mod
from gateway.ingest import Ingest, Prepared
from gateway.ingest.timestamps import iso, parse_iso_datetime
from gateway.testing import AUTH_HEADERS, WRITE_KEY, gateway_config, post, spool_calls

NOW = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=timezone.utc)
NOW_ISO = "2024-05-06T07:08:09.123Z"
#: the spool is read right after each post; no purge may come first
KEEP = {"retention": 3600}


@pytest.fixture
def ingest(tmp_path: Path) -> Callable[..., Ingest]:
    """``ingest(**config)``: the ingest stage of a gateway built from ``gateway_config``."""
    def make(**config: Any) -> Ingest:
        return Ingest(config_mod.loads(gateway_config(tmp_path, **config)), [])
    return make


def prepare(ing: Ingest, kind: str, payload: Any, *, peer: str | None = "198.51.100.7",
            headers: dict[str, str] | None = None, now: datetime = NOW) -> tuple[Prepared, list[dict[str, Any]]]:
    p = ing.prepare(kind, msgspec.json.encode(payload), {**AUTH_HEADERS, **(headers or {})}, peer, now=now)
    return p, [msgspec.json.decode(r) for r in p.rows]


def one(ing: Ingest, kind: str, payload: Any, **kw: Any) -> dict[str, Any]:
    p, calls = prepare(ing, kind, payload, **kw)
    assert p.rejections == [] and len(calls) == 1, p.rejections
    return calls[0]


# -- messageId, receivedAt ------------------------------------------------------------

def test_message_id_added_when_absent_and_kept_when_present(ingest: Callable[..., Ingest]) -> None:
    """docs/pipelines-api.md, messageId: "A unique identifier for a
    Data Pipelines call ... This is set by Customer.io" when the client did not."""
    ing = ingest()
    kept = one(ing, "track", {"userId": "u1", "event": "E", "messageId": "client-id-1"})
    assert kept["messageId"] == "client-id-1"
    _, calls = prepare(ing, "batch", {"batch": [
        {"type": "track", "userId": "u1", "event": "E"},
        {"type": "track", "userId": "u1", "event": "E", "messageId": ""},
        {"type": "track", "userId": "u1", "event": "E", "messageId": "mine"},
        {"type": "track", "userId": "u1", "event": "E"},
    ]})
    ids = [c["messageId"] for c in calls]
    assert ids[2] == "mine"
    generated = [ids[0], ids[1], ids[3]]
    assert all(isinstance(i, str) and len(i) >= 8 for i in generated)
    more = [one(ing, "identify", {"userId": "u1"})["messageId"] for _ in range(50)]
    assert len(set(generated + more)) == 53, "every generated messageId is unique"


def test_received_at_is_the_gateway_clock(ingest: Callable[..., Ingest]) -> None:
    """docs/pipelines-api.md, "Timestamps": receivedAt, ISO-8601 in
    milliseconds with a Z; a client's own receivedAt is overwritten."""
    call = one(ingest(), "track", {"userId": "u1", "event": "E", "receivedAt": "1999-01-01T00:00:00.000Z"})
    assert call["receivedAt"] == NOW_ISO


# -- timestamps --------------------------------------------------------------------------

def test_clock_skew_is_corrected_from_sent_at(ingest: Callable[..., Ingest]) -> None:
    """timestamp = receivedAt - (sentAt - originalTimestamp); originalTimestamp
    keeps the client's timestamp as sent (docs/pipelines-api.md,
    "Timestamps")."""
    # The device clock is 10.5 s behind ours; the call happened 2 s before it was sent.
    call = one(ingest(), "track", {"userId": "u1", "event": "E",
                                   "timestamp": "2024-05-06T07:07:56.623Z",
                                   "sentAt": "2024-05-06T07:07:58.623Z"})
    assert call["originalTimestamp"] == "2024-05-06T07:07:56.623Z"
    assert call["sentAt"] == "2024-05-06T07:07:58.623Z"
    assert call["receivedAt"] == NOW_ISO
    assert call["timestamp"] == "2024-05-06T07:08:07.123Z"


def test_skew_with_a_clock_ahead_and_zone_offsets(ingest: Callable[..., Ingest]) -> None:
    """The same arithmetic for a device clock ahead of ours (by two minutes),
    with times written with a +02:00 offset; the result is UTC with a Z."""
    call = one(ingest(), "page", {"anonymousId": "a1",
                                  "timestamp": "2024-05-06T09:10:00.250+02:00",
                                  "sentAt": "2024-05-06T09:10:30+02:00"})
    # sentAt - timestamp = 29.750 s
    assert call["originalTimestamp"] == "2024-05-06T09:10:00.250+02:00"
    assert call["timestamp"] == "2024-05-06T07:07:39.373Z"


def test_batch_level_sent_at_applies_to_calls_without_one(ingest: Callable[..., Ingest]) -> None:
    """SDKs put sentAt on the batch envelope (docs/pipelines-api.md,
    sentAt: "when a library sends an event"); a call's own sentAt wins."""
    _, calls = prepare(ingest(), "batch", {
        "sentAt": "2024-05-06T07:00:00.000Z",
        "batch": [
            {"type": "track", "userId": "u1", "event": "A", "timestamp": "2024-05-06T06:59:59.000Z"},
            {"type": "track", "userId": "u1", "event": "B", "timestamp": "2024-05-06T06:59:59.000Z",
             "sentAt": "2024-05-06T07:00:05.000Z"},
            {"type": "track", "userId": "u1", "event": "C"},
        ]})
    a, b, c = calls
    assert (a["sentAt"], a["timestamp"], a["originalTimestamp"]) == (
        "2024-05-06T07:00:00.000Z", "2024-05-06T07:08:08.123Z", "2024-05-06T06:59:59.000Z")
    assert (b["sentAt"], b["timestamp"]) == ("2024-05-06T07:00:05.000Z", "2024-05-06T07:08:03.123Z")
    assert c["timestamp"] == NOW_ISO, "no client time: the event happened when we received it"
    assert all(x["receivedAt"] == NOW_ISO for x in calls)


def test_timestamp_without_sent_at_is_kept(ingest: Callable[..., Ingest]) -> None:
    """docs/pipelines-api.md, "Backfilling data": a timestamp sent
    without sentAt is when the event happened, kept as sent."""
    ing = ingest()
    call = one(ing, "track", {"userId": "u1", "event": "E", "timestamp": "2021-01-02T03:04:05.678Z"})
    assert call["timestamp"] == call["originalTimestamp"] == "2021-01-02T03:04:05.678Z"
    assert "sentAt" not in call
    call = one(ing, "track", {"userId": "u1", "event": "E"})
    assert call["timestamp"] == NOW_ISO and "originalTimestamp" not in call


def test_original_timestamp_alone_is_the_client_time(ingest: Callable[..., Ingest]) -> None:
    """A call that carries originalTimestamp but no timestamp (as Segment's
    stored calls do) is corrected from it."""
    call = one(ingest(), "screen", {"userId": "u1", "originalTimestamp": "2024-05-06T07:07:00.000Z",
                                    "sentAt": "2024-05-06T07:07:01.000Z"})
    assert call["originalTimestamp"] == "2024-05-06T07:07:00.000Z"
    assert call["timestamp"] == "2024-05-06T07:08:08.123Z"


@pytest.mark.parametrize("field,value", [("timestamp", "yesterday"), ("timestamp", 1361205308),
                                         ("sentAt", "not a date"), ("originalTimestamp", "2024-13-45")])
def test_unreadable_times_reject_the_call(ingest: Callable[..., Ingest], field: str, value: Any) -> None:
    """docs/pipelines-api.md: timestamp, sentAt and originalTimestamp
    are ISO-8601 date-times; anything else is a validation failure naming the field."""
    p, calls = prepare(ingest(), "track", {"userId": "u1", "event": "E", field: value})
    assert calls == []
    assert [(r.reason, r.field) for r in p.rejections] == [("bad_field", field)]


async def test_skew_over_http(gateway_client: Any, tmp_path: Path) -> None:
    """The skew arithmetic end to end: exact to the millisecond against the
    receivedAt the gateway stored."""
    client = await gateway_client(storage=KEEP)
    got, doc, _ = await post(client, "/v1/batch", {
        "sentAt": "2020-01-01T00:00:10.000Z",
        "batch": [{"type": "track", "userId": "u1", "event": "E", "timestamp": "2020-01-01T00:00:07.250Z"}]})
    assert (got, doc) == (200, {})
    [call] = spool_calls(tmp_path)
    received = parse_iso_datetime(call["receivedAt"])
    assert received is not None and abs((received - datetime.now(timezone.utc)).total_seconds()) < 30
    expected = received.timestamp() - 2.75
    assert call["timestamp"] == iso(datetime.fromtimestamp(expected, timezone.utc))
    assert call["originalTimestamp"] == "2020-01-01T00:00:07.250Z"
    assert call["sentAt"] == "2020-01-01T00:00:10.000Z"


# -- context.ip ------------------------------------------------------------------------------

def test_context_ip_from_the_peer(ingest: Callable[..., Ingest]) -> None:
    """docs/pipelines-api.md, context.ip: "captured ... by our
    servers"; an untrusted peer's X-Forwarded-For is ignored; an ip the client
    set itself is kept."""
    ing = ingest()
    call = one(ing, "track", {"userId": "u1", "event": "E"}, headers={"X-Forwarded-For": "203.0.113.9"})
    assert call["context"]["ip"] == "198.51.100.7"
    call = one(ing, "track", {"userId": "u1", "event": "E", "context": {"ip": "192.0.2.44"}})
    assert call["context"]["ip"] == "192.0.2.44"
    call = one(ing, "track", {"userId": "u1", "event": "E"}, peer="2001:db8::5")
    assert call["context"]["ip"] == "2001:db8::5"


def test_x_forwarded_for_only_from_trusted_proxies(ingest: Callable[..., Ingest]) -> None:
    """server.trusted_proxies (IPs or CIDRs): from those peers the client is the
    right-most address of X-Forwarded-For that is not itself a trusted proxy."""
    ing = ingest(server={"trusted_proxies": ["10.0.0.0/8", "127.0.0.1"]})
    xff = {"X-Forwarded-For": "203.0.113.9"}
    assert one(ing, "track", {"userId": "u1", "event": "E"}, peer="10.1.2.3", headers=xff)["context"]["ip"] \
        == "203.0.113.9"
    assert one(ing, "track", {"userId": "u1", "event": "E"}, peer="198.51.100.7", headers=xff)["context"]["ip"] \
        == "198.51.100.7", "a peer that is no proxy of ours cannot choose its ip"
    chain = {"X-Forwarded-For": "1.1.1.1, 203.0.113.9, 10.9.9.9"}
    assert one(ing, "track", {"userId": "u1", "event": "E"}, peer="127.0.0.1", headers=chain)["context"]["ip"] \
        == "203.0.113.9", "the left-most entries are the client's to forge"
    assert one(ing, "track", {"userId": "u1", "event": "E"}, peer="10.0.0.1")["context"]["ip"] == "10.0.0.1"


async def test_context_ip_over_http(gateway_client: Any, tmp_path: Path) -> None:
    """The real peer address of the socket, and X-Forwarded-For from a trusted
    proxy (the test client connects from 127.0.0.1)."""
    client = await gateway_client(storage=KEEP)
    await post(client, "/v1/track", {"userId": "u1", "event": "E", "messageId": "a"},
               headers={"X-Forwarded-For": "203.0.113.9"})
    assert spool_calls(tmp_path)[0]["context"]["ip"] == "127.0.0.1"


async def test_context_ip_over_http_behind_a_trusted_proxy(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(server={"trusted_proxies": ["127.0.0.1"]}, storage=KEEP)
    await post(client, "/v1/track", {"userId": "u1", "event": "E", "messageId": "b"},
               headers={"X-Forwarded-For": "203.0.113.9"})
    assert spool_calls(tmp_path)[0]["context"]["ip"] == "203.0.113.9"


# -- batch context and integrations ----------------------------------------------------------

def test_batch_context_and_integrations_are_merged_call_keys_win(ingest: Callable[..., Ingest]) -> None:
    """docs/pipelines-api.md, "Batch requests": "the context and
    integrations objects apply to all calls in the request"; a key the call
    sets itself is kept."""
    _, calls = prepare(ingest(), "batch", {
        "context": {"locale": "fr-FR", "library": {"name": "batch-lib", "version": "1"}},
        "integrations": {"All": False, "Webhook": True},
        "batch": [
            {"type": "track", "userId": "u1", "event": "A"},
            {"type": "track", "userId": "u1", "event": "B",
             "context": {"library": {"name": "call-lib"}, "page": {"path": "/"}},
             "integrations": {"Webhook": False, "Archive": True}},
        ]})
    a, b = calls
    assert a["context"] == {"locale": "fr-FR", "library": {"name": "batch-lib", "version": "1"},
                            "ip": "198.51.100.7"}
    assert a["integrations"] == {"All": False, "Webhook": True}
    assert b["context"] == {"library": {"name": "call-lib"}, "page": {"path": "/"}, "locale": "fr-FR",
                            "ip": "198.51.100.7"}
    assert b["integrations"] == {"Webhook": False, "Archive": True, "All": False}


def test_batch_context_ip_is_not_overwritten(ingest: Callable[..., Ingest]) -> None:
    _, calls = prepare(ingest(), "batch", {"context": {"ip": "192.0.2.1"},
                                           "batch": [{"type": "identify", "userId": "u1"}]})
    assert calls[0]["context"]["ip"] == "192.0.2.1"


# -- traits, type, stripped keys -------------------------------------------------------------

def test_identify_traits_from_context_traits(ingest: Callable[..., Ingest]) -> None:
    """RudderStack's SDKs send identify traits only in context.traits; the
    gateway lifts them to traits when the call has none (and keeps the call's
    own traits when it has them)."""
    ing = ingest()
    call = one(ing, "identify", {"userId": "u1", "context": {"traits": {"email": "a@example.com"}}})
    assert call["traits"] == {"email": "a@example.com"}
    assert call["context"]["traits"] == {"email": "a@example.com"}
    call = one(ing, "identify", {"userId": "u1", "traits": {"plan": "pro"},
                                 "context": {"traits": {"email": "a@example.com"}}})
    assert call["traits"] == {"plan": "pro"}
    call = one(ing, "track", {"userId": "u1", "event": "E", "context": {"traits": {"email": "a@example.com"}}})
    assert "traits" not in call, "only identify takes traits"


def test_type_comes_from_the_path_on_single_call_endpoints(ingest: Callable[..., Ingest]) -> None:
    """The path names the call (docs/pipelines-api.md: one endpoint
    per call); a body type that disagrees is overruled, and the path's
    required fields apply."""
    ing = ingest()
    assert one(ing, "track", {"type": "identify", "userId": "u1", "event": "E"})["type"] == "track"
    assert one(ing, "i", {"type": "track", "userId": "u1"})["type"] == "identify"
    assert one(ing, "g", {"groupId": "g1"})["type"] == "group"
    p, calls = prepare(ing, "track", {"type": "identify", "userId": "u1"})
    assert calls == [] and [(r.reason, r.field) for r in p.rejections] == [("missing_field", "event")]


def test_write_key_and_metadata_are_stripped_unknown_keys_kept(ingest: Callable[..., Ingest]) -> None:
    """writeKey is a credential, _metadata is analytics.js bookkeeping: neither
    is stored; keys the gateway does not know (channel, version) are kept, as
    the Pipelines destination forwards calls as sent."""
    ing = ingest()
    call = one(ing, "track", {"userId": "u1", "event": "E", "writeKey": WRITE_KEY, "channel": "server",
                              "version": 2, "_metadata": {"bundled": ["Segment.io"], "unbundled": []}})
    assert "writeKey" not in call and "_metadata" not in call
    assert (call["channel"], call["version"]) == ("server", 2)
    _, calls = prepare(ing, "batch", {"writeKey": WRITE_KEY, "batch": [
        {"type": "page", "anonymousId": "a1", "writeKey": WRITE_KEY, "_metadata": {}}]})
    assert "writeKey" not in calls[0] and "_metadata" not in calls[0]
    assert WRITE_KEY.encode() not in b"".join(ing.prepare("batch", msgspec.json.encode(
        {"writeKey": WRITE_KEY, "batch": [{"type": "page", "anonymousId": "a1", "writeKey": WRITE_KEY}]}),
        {}, None, now=NOW).rows)


async def test_enrichment_over_http(gateway_client: Any, tmp_path: Path) -> None:
    """Everything at once through the real app, read back from the spool."""
    client = await gateway_client(storage=KEEP)
    got, doc, _ = await post(client, "/v1/b", {
        "writeKey": WRITE_KEY, "context": {"locale": "de-DE"}, "integrations": {"All": True},
        "batch": [{"type": "identify", "userId": "u1", "_metadata": {"x": 1},
                   "context": {"traits": {"name": "Ada"}}}]}, auth=False, headers={"Content-Type": "text/plain"})
    assert (got, doc) == (200, {})
    [call] = spool_calls(tmp_path)
    assert set(call) == {"type", "userId", "context", "traits", "messageId", "receivedAt", "timestamp",
                         "integrations"}
    assert call["context"] == {"traits": {"name": "Ada"}, "locale": "de-DE", "ip": "127.0.0.1"}
    assert call["traits"] == {"name": "Ada"}
    assert call["integrations"] == {"All": True}
    assert call["timestamp"] == call["receivedAt"]
