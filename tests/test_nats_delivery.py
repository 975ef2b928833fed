"""The real app with ``storage.backend: nats`` (one real nats-server), its
delivery engine against fake destinations on real sockets: retries with the
destination's backoff and Retry-After, per-item failures, dead letters in
JetStream, order per destination, a destination that is down holding back
neither another one nor ingest, and the backend's /metrics and /ready."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, AsyncIterator

import msgspec
import pytest
from aiohttp import web

from gateway.spool.nats_dead_letters import NatsDeadLetters
from gateway.testing import (
    Action, FakeDestination, ReceivedRequest, metrics, post, sample, send, send_batch, status, track, wait_metric,
    wait_until, webhook,
)
from nats_servers import NatsCluster, delete_streams, nats_config, prefix, storage_config


@pytest.fixture
async def nats_storage(nats_node: NatsCluster) -> AsyncIterator[dict[str, Any]]:
    """The ``storage`` block of a gateway on the session's nats-server, with
    streams of its own (deleted at the end).  Ask for it before gateway_client."""
    stream = prefix()
    yield nats_config(nats_node.urls, stream)
    await delete_streams(nats_node.urls, stream)


def dead_letters(storage: dict[str, Any]) -> list[Any]:
    store = NatsDeadLetters(storage_config(storage["nats"]["servers"], storage["nats"]["stream"]))
    try:
        return store.list()
    finally:
        store.close()


async def test_retries_honour_backoff_and_retry_after(nats_storage: dict[str, Any], gateway_client: Any,
                                                      fake_destination: FakeDestination) -> None:
    fake_destination.script = [status(500, "boom"), status(429, "slow down", {"Retry-After": "1"}), status(503)]
    client = await gateway_client(storage=nats_storage, destinations=[webhook("Hook", fake_destination.url)])
    await send(client, track("m-1"))
    reqs = await fake_destination.wait_requests(4, timeout=15)
    assert [r.status for r in reqs] == [500, 429, 503, 200]
    assert reqs[2].t - reqs[1].t >= 1.0, "Retry-After: 1 was honoured"
    assert all(r.json == reqs[0].json for r in reqs)
    await fake_destination.wait_quiet()
    assert len(fake_destination.requests) == 4, "nothing is sent again once delivered"
    # The fake sees a call before the gateway has its answer (and counts it).
    await wait_metric(client, "gateway_destination_delivered_total", lambda v: v == 1,
                      destination="Hook")
    ms = await metrics(client)
    assert sample(ms, "gateway_destination_delivered_total", destination="Hook") == 1
    assert sample(ms, "gateway_destination_retried_total", destination="Hook") == 3


def itemized_answers() -> Action:
    """207 with one result per item: ``fail`` is a 422, ``flaky`` a 503 the first time."""
    seen: set[str] = set()

    async def act(request: web.Request, req: ReceivedRequest) -> web.StreamResponse:
        results = []
        for item in req.json["items"]:
            if item["behave"] == "fail":
                results.append({"status": 422, "error": f"email of {item['id']} is not an email"})
            elif item["behave"] == "flaky" and item["id"] not in seen:
                seen.add(item["id"])
                results.append({"status": 503, "error": "try again"})
            else:
                results.append({"status": 200})
        return web.json_response({"results": results}, status=207)
    return act


async def test_a_per_item_failure_touches_only_that_call(nats_storage: dict[str, Any], gateway_client: Any,
                                                         fake_destination: FakeDestination, test_plugins: Path) -> None:
    fake_destination.default = itemized_answers()
    items = {**webhook("Items", fake_destination.url), "type": "itemized", "settings": {"endpoint": fake_destination.url}}
    client = await gateway_client(storage=nats_storage, destinations=[items], plugins=["itemized_destination"])
    await send_batch(client, [track("ok-1"), track("bad-1", properties={"behave": "fail"}),
                              track("flaky-1", properties={"behave": "flaky"}),
                              track("unmappable-1", event="Unmappable"), track("ok-2")])
    reqs = await fake_destination.wait_requests(2)
    assert [i["id"] for i in reqs[0].json["items"]] == ["ok-1", "bad-1", "flaky-1", "ok-2"]
    assert [i["id"] for i in reqs[1].json["items"]] == ["flaky-1"]
    await fake_destination.wait_quiet()
    assert len(fake_destination.requests) == 2
    dead = {d.message_id: d for d in await asyncio.to_thread(dead_letters, nats_storage)}
    assert set(dead) == {"bad-1", "unmappable-1"}
    bad = dead["bad-1"]
    assert (bad.destination, bad.status, bad.reason, bad.attempts) == \
        ("Items", 422, "item 422: email of bad-1 is not an email", 1)
    assert msgspec.json.decode(bad.data)["messageId"] == "bad-1"
    # The fake sees a call before the gateway has its answer (and counts it).
    await wait_metric(client, "gateway_destination_delivered_total", lambda v: v == 3,
                      destination="Items")
    ms = await metrics(client)
    assert sample(ms, "gateway_destination_delivered_total", destination="Items") == 3
    assert sample(ms, "gateway_destination_retried_total", destination="Items") == 1


async def test_order_is_kept_for_one_destination(nats_storage: dict[str, Any], gateway_client: Any,
                                                 fake_destination: FakeDestination) -> None:
    client = await gateway_client(storage=nats_storage, destinations=[
        webhook("Hook", fake_destination.url, concurrency=1, batch={"max_calls": 7})])
    sent = []
    for i in range(10):
        call = track(f"s-{i}")
        sent.append(call["messageId"])
        await send(client, call)
        batch = [track(f"b-{i}-{j}") for j in range(9)]
        sent += [c["messageId"] for c in batch]
        await send_batch(client, batch)
    await wait_until(lambda: len(fake_destination.delivered()) >= len(sent), what="every call")
    assert [c["messageId"] for c in fake_destination.delivered()] == sent
    assert max(len(r.json["batch"]) for r in fake_destination.requests) <= 7


async def test_a_down_destination_holds_back_neither_another_nor_ingest(
        nats_storage: dict[str, Any], gateway_client: Any, make_fake_destination: Any) -> None:
    up, down = await make_fake_destination(), await make_fake_destination()
    down.default = status(503, headers={"Retry-After": "30"})
    client = await gateway_client(storage=nats_storage, destinations=[webhook("Up", up.url), webhook("Down", down.url)])
    started = time.monotonic()
    for i in range(20):
        await send_batch(client, [track(f"m-{i}-{j}") for j in range(10)])
    assert time.monotonic() - started < 5, "ingest was not held back"
    await wait_until(lambda: len(up.delivered()) >= 200, what="Up to get everything")
    assert len(down.requests) == 1, "Down holds its queue behind Retry-After"
    await wait_metric(client, "gateway_destination_backlog", lambda v: (v or 0) > 0, destination="Down")
    await wait_metric(client, "gateway_nats_consumer_ack_pending_messages", lambda v: (v or 0) > 0,
                      destination="Down")
    await wait_metric(client, "gateway_destination_backlog", lambda v: v == 0, destination="Up")
    ms = await metrics(client)
    assert sample(ms, "gateway_nats_connected") == 1
    assert (sample(ms, "gateway_nats_publish_seconds_count") or 0) >= 1
    assert sample(ms, "gateway_nats_leased_calls", destination="Down") == 200
    assert sample(ms, "gateway_nats_consumer_pending_messages", destination="Up") == 0
    resp = await client.get("/ready")
    assert resp.status == 200, await resp.text()


async def test_a_full_stream_is_a_503_with_retry_after(nats_storage: dict[str, Any], gateway_client: Any,
                                                       fake_destination: FakeDestination) -> None:
    """storage.max_bytes is the calls stream's limit (discard new): past it a
    503 with Retry-After, never a 200; once delivered calls are purged, 200 again."""
    fake_destination.default = status(503, headers={"Retry-After": "1"})
    client = await gateway_client(storage={**nats_storage, "max_bytes": "64KiB"},
                                  destinations=[webhook("Hook", fake_destination.url)])
    answers = []
    for k in range(20):
        batch = [track(f"f-{k}-{i}", properties={"pad": "x" * 300}) for i in range(20)]  # new ids: stored each time
        a = await post(client, "/v1/batch", {"batch": batch})
        answers.append(a)
        if a.status != 200:
            break
    last = answers[-1]
    assert last.status == 503 and last.response.headers.get("Retry-After"), [a.status for a in answers]
    assert "full" in last.body["error"] or "storage.max_bytes" in last.body["error"]
    resp = await client.get("/ready")
    assert resp.status == 503
    fake_destination.default = status(200)
    await wait_until(lambda: len(fake_destination.delivered()) >= 20 * (len(answers) - 1), timeout=20,
                     what="the stored calls to be delivered")

    async def accepted() -> bool:
        return (await post(client, "/v1/track", track("after"))).status == 200
    await wait_until(accepted, timeout=10, what="a 200 once the purge made room")
