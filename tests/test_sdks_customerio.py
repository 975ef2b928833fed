"""End to end (issue 4): each of the three Python SDKs sends every call type
through one gateway to both Customer.io destinations at once.

The Pipelines copy must be the call as the SDK sent it plus the gateway's
enrichment: it is compared with what a plain webhook destination received
from the same spool (tests/test_python_sdks.py checks that copy against the
SDK field by field).  The Track copy must be the mapped operation of that same
call (docs/customerio-track-v2.md §4; the mapping itself is checked against
the worked examples of docs/customerio-track-v2.md §10 in tests/test_customerio_track.py)."""

from __future__ import annotations

import asyncio
import importlib
import json
from typing import Any, Callable

import msgspec
import pytest

from fake_customerio import PIPELINES_API_KEY, SITE_ID, TRACK_API_KEY, FakeCustomerIO
from gateway.http_client import HttpClient, HttpPool, Throttle
from gateway.testing import WRITE_KEY, FakeDestination
from plugins.customerio.track_v2 import CustomerioTrackDestination as Track
from test_python_sdks import SDKS, send_all

TYPES = ["alias", "group", "identify", "page", "screen", "track"]


def canonical(items: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(i, sort_keys=True) for i in items)


@pytest.mark.parametrize("sdk", sorted(SDKS))
async def test_each_sdk_reaches_both_customerio_destinations(
        gateway_client: Callable[..., Any], cio: FakeCustomerIO, fake_destination: FakeDestination,
        monkeypatch: pytest.MonkeyPatch,
        no_proxy: None, sdk: str) -> None:
    module_name, _, host_attr = SDKS[sdk]
    mod = importlib.import_module(module_name)
    client = await gateway_client(f"""
        destinations:
          - name: Customer.io
            type: customerio_track
            settings: {{site_id: {SITE_ID}, api_key: {TRACK_API_KEY}, region: us, endpoint: "{cio.url}"}}
            batch: {{max_wait: 0.01}}
          - name: Customer.io Data Pipelines
            type: customerio_pipelines
            settings: {{api_key: {PIPELINES_API_KEY}, region: eu, endpoint: "{cio.url}"}}
            batch: {{max_wait: 0.01}}
          - name: Archive
            type: webhook
            settings: {{url: "{fake_destination.url}"}}
            batch: {{max_wait: 0.01}}
        """)
    errors: list[Any] = []
    monkeypatch.setattr(mod, "default_client", None)
    monkeypatch.setattr(mod, "write_key", WRITE_KEY)
    monkeypatch.setattr(mod, host_attr, str(client.make_url("")).rstrip("/"))
    monkeypatch.setattr(mod, "on_error", lambda e, batch: errors.append(e))
    monkeypatch.setattr(mod, "max_retries", 1)
    monkeypatch.setattr(mod, "sync_mode", False)
    monkeypatch.setattr(mod, "send", True)
    await asyncio.wait_for(asyncio.to_thread(send_all, mod, errors), 30)
    assert errors == [], errors

    stored = await fake_destination.wait_delivered(6, timeout=15)
    await cio.wait_for(lambda: len(cio.pipelines_calls) >= 6 and len(cio.track_ops) >= 6)
    assert sorted(c["type"] for c in stored) == TYPES

    # Pipelines: the call as sent plus enrichment, context and integrations kept.
    assert canonical(cio.pipelines_calls) == canonical(stored)
    for call in cio.pipelines_calls:
        assert call["context"]["library"]["name"] == "analytics-python"
        assert call["context"]["ip"] == "127.0.0.1" and call["receivedAt"].endswith("Z")
    [req] = {r.headers.get("X-Strict-Mode") for r in cio.requests if r.path == "/v1/batch"} or [None]
    assert req == "1", "the Pipelines destination asks Customer.io for strict validation"

    # Track v2: one mapped operation per call, as the plugin maps the stored call.
    pool = HttpPool()  # the mapper only prepares: nothing connects
    mapper = Track("Customer.io", Track.Settings(site_id=SITE_ID, api_key=TRACK_API_KEY, endpoint=cio.url),
                   HttpClient(pool, Throttle(1e9, 1.0)))
    expected = [msgspec.json.decode(mapper.prepare(json.loads(json.dumps(c)))) for c in stored]
    await pool.close()
    assert canonical(cio.track_ops) == canonical(expected)
    ops = {(op["type"], op["action"]): op for op in cio.track_ops}
    assert sorted(ops) == [("object", "identify"), ("person", "event"), ("person", "identify"),
                           ("person", "merge"), ("person", "page"), ("person", "screen")]
    assert ops["person", "event"]["name"] == "Order Completed"
    assert ops["person", "event"]["identifiers"] == {"id": "u-1"}
    assert ops["object", "identify"]["identifiers"]["object_id"] == "g-1"
    assert (ops["person", "merge"]["primary"], ops["person", "merge"]["secondary"]) == ({"id": "u-1"}, {"id": "anon-1"})
    for key in (("person", "identify"), ("person", "event"), ("person", "page"), ("person", "screen")):
        # docs/customerio-track-v2.md §5.1
        assert isinstance(ops[key]["timestamp"], int), "ISO timestamps become Unix seconds"
