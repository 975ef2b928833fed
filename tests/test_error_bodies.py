"""Error bodies that SDKs can read (issue 12, point 1; docs/pipelines-api.md,
"Error bodies").

customerio-cdp-analytics and rudder-sdk-python read a non-2xx answer as
``payload['code']`` and ``payload['message']`` and catch only ``ValueError``:
a body without those keys raises ``KeyError``, which their consumer retries,
so a final 400 was sent again and the good calls of the batch were stored
once per attempt.  Here every error body of the ingest endpoints is checked
for both keys, and the issue's scenario is run with the real clients.
"""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from typing import Any

import pytest

from gateway import app_state
from gateway.testing import WRITE_KEY, metrics, post, sample, spool_calls, track
from test_ingest_http import LIMITS, TABLE

REGION_KEY = "pk_us_key"  # the key: customerio-cdp-analytics sends it as Bearer
#: no destination reads the spool, so the purge would remove what it stores: keep it for the test to read
KEEP = {"retention": 3600}


def assert_readable(doc: Any, code: str) -> None:
    """What the Python SDKs read, and what this gateway always said beside it."""
    assert isinstance(doc, dict), doc
    assert doc["code"] == code and isinstance(doc["code"], str), doc
    assert isinstance(doc["message"], str) and doc["message"], doc
    assert doc["error"] == doc["message"] and doc["reason"] == doc["code"], doc


@pytest.mark.parametrize("row", sorted(TABLE))
async def test_every_strict_rejection_has_code_and_message(gateway_client: Any, row: str) -> None:
    """Each row of the strict/lax table, 401 and 400 alike, keeps ``field``
    and ``limit`` beside the two new keys."""
    path, data, headers, with_key, status, reason, field, limit = TABLE[row]
    client = await gateway_client(server=LIMITS)
    got, doc, _ = await post(client, path, data, strict=True, auth=with_key, headers=headers)
    assert got == status, doc
    assert_readable(doc, reason)
    assert (doc.get("field"), doc.get("limit")) == (field, limit)


async def test_batch_error_has_code_and_message_beside_its_errors(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage=KEEP, sources=[{"name": "web", "write_keys": [WRITE_KEY], "strict": True}])
    got, doc, _ = await post(client, "/v1/batch",
                             {"batch": [track("m-1"), {"type": "group", "userId": "u1"}, track("m-2")]})
    assert got == 400
    assert_readable(doc, "missing_field")
    assert doc["accepted"] == 2
    assert [(e["index"], e["field"], e["reason"]) for e in doc["errors"]] == [(1, "batch[1].groupId", "missing_field")]
    assert sorted(c["messageId"] for c in spool_calls(tmp_path)) == ["m-1", "m-2"]


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lax"])
async def test_overload_503_has_code_and_message(gateway_client: Any, strict: bool) -> None:
    client = await gateway_client(storage={"max_bytes": 10})
    got, doc, resp = await post(client, "/v1/track", track("m-1"), strict=strict)
    assert got == 503 and int(resp.headers["Retry-After"]) > 0
    assert_readable(doc, "overload")


async def test_internal_error_has_code_and_message(gateway_client: Any) -> None:
    """A bug on the ingest path (here: prepare raising) is a 500 the SDKs can
    read too; they retry a 500, which is right for a fault of ours."""
    client = await gateway_client()

    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("injected by the test")

    client.app[app_state.INGEST].prepare = broken
    got, doc, _ = await post(client, "/v1/track", track("m-1"))
    assert got == 500
    assert_readable(doc, "internal")


async def test_unknown_settings_key_has_code_and_message(gateway_client: Any) -> None:
    client = await gateway_client()
    resp = await client.get("/v1/projects/no-such-key/settings")
    assert resp.status == 404
    assert_readable(await resp.json(), "auth")


# -- the scenario, with the real clients -------------------------------------------

#: name → (Client module, write key)
CLIENTS = {
    "customerio": ("customerio.analytics", REGION_KEY),
    "rudderstack": ("rudderstack.analytics", WRITE_KEY),
    "segment": ("segment.analytics", WRITE_KEY),  # reads code and message too, and also catches KeyError
}


def send_six_and_one_too_large(client: Any) -> None:
    """Six ordinary calls and one track call with a 5,000-byte property, then flush."""
    client.identify("u-1", {"plan": "pro"}, message_id="good-identify")
    client.track("u-1", "Signed Up", {"n": 1}, message_id="good-track")
    client.page("u-1", "Docs", "Home", {"path": "/"}, message_id="good-page")
    client.screen("u-1", "App", "Settings", {"tab": 2}, message_id="good-screen")
    client.group("u-1", "g-1", {"name": "Acme"}, message_id="good-group")
    client.alias("anon-1", "u-1", message_id="good-alias")
    client.track("u-1", "Too Large", {"blob": "x" * 5000}, message_id="too-large")
    client.flush()
    client.join()


@pytest.mark.parametrize("sdk", sorted(CLIENTS))
async def test_a_final_400_is_not_retried_so_nothing_is_stored_twice(
        gateway_client: Any, tmp_path: Path, no_proxy: None, sdk: str) -> None:
    """The issue's reproduction: ``strict: true``, ``max_event_bytes: 2KiB``,
    ``Client(key, host=URL, max_retries=2)``.  Before the fix the 400 came
    three times and each good call was stored three times."""
    module_name, key = CLIENTS[sdk]
    Client = importlib.import_module(module_name).Client
    client = await gateway_client(server={"max_event_bytes": "2KiB"}, storage=KEEP,
                                  sources=[{"name": "server", "write_keys": [key], "strict": True}])
    url = str(client.make_url("")).rstrip("/")
    errors: list[Any] = []  # the SDK's own APIError: status, code, message
    sdk_client = Client(key, host=url, max_retries=2, on_error=lambda e, batch: errors.append(e))
    await asyncio.wait_for(asyncio.to_thread(send_six_and_one_too_large, sdk_client), 60)

    ids = [c["messageId"] for c in spool_calls(tmp_path)]
    assert sorted(ids) == sorted(["good-identify", "good-track", "good-page", "good-screen", "good-group",
                                  "good-alias"]), "each good call exactly once, the large one not at all"
    ms = await metrics(client)
    assert sample(ms, "gateway_http_requests_total", endpoint="/v1/batch", status="400") == 1, "sent once"
    assert sample(ms, "gateway_calls_rejected_total", reason="size") == 1
    # The SDK saw the gateway's reason, not its own "unknown" fallback.
    assert len(errors) == 1, errors
    assert (errors[0].status, errors[0].code) == (400, "size"), vars(errors[0])
    assert "batch[6]" in errors[0].message and "2048" in errors[0].message, errors[0].message
