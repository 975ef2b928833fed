"""The delivery engine against fake destinations on real sockets, failing in
every way README.md names: retryable statuses, Retry-After (seconds and
HTTP-date), timeouts, dropped connections, per-item outcomes, permanent
4xx, retries running out (count and time window), Paused, a destination
that hangs, ordering, and the ``gateway_destination_*`` metrics."""

from __future__ import annotations

import asyncio
import email.utils
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from gateway.delivery import sender as delivery_sender
from gateway.testing import (
    Action, FakeDestination, ReceivedRequest, dead_letters, drop_connection, hang_until, metrics, sample, send,
    send_batch, sleep_then, spool_query, status, track, wait_metric, wait_until, webhook,
)


# -- retryable answers -------------------------------------------------------------

async def test_retryable_statuses_are_retried_until_delivered(gateway_client: Any, fake_destination: FakeDestination,
                                                              tmp_path: Path) -> None:
    fake_destination.script = [status(500, "boom"), status(408), status(429), status(503)]
    client = await gateway_client(destinations=[webhook("Hook", fake_destination.url)])
    await send(client, track("m-1"))
    reqs = await fake_destination.wait_requests(5)
    assert [r.status for r in reqs] == [500, 408, 429, 503, 200]
    assert all(r.json == reqs[0].json for r in reqs), "every attempt sends the same stored call"
    assert [c["messageId"] for c in fake_destination.delivered()] == ["m-1"]
    await fake_destination.wait_quiet()  # longer than the poll of the retries table
    assert len(fake_destination.requests) == 5, "nothing is sent again once delivered"
    # The fake sees a call before the gateway has its answer (and counts it).
    await wait_metric(client, "gateway_destination_delivered_total", lambda v: v == 1,
                      destination="Hook")
    ms = await metrics(client)
    assert sample(ms, "gateway_destination_delivered_total", destination="Hook") == 1
    assert sample(ms, "gateway_destination_retried_total", destination="Hook") == 4
    assert sample(ms, "gateway_destination_requests_total", destination="Hook", result="sent") == 5
    assert not [k for k in ms if k[0] == "gateway_destination_dead_letters_total"]
    assert dead_letters(tmp_path) == []
    assert spool_query(tmp_path, "SELECT count(*) FROM retries") == [(0,)]


async def test_retry_after_seconds_holds_every_send(gateway_client: Any, fake_destination: FakeDestination) -> None:
    # One request per call, one at a time: after the 429 nothing at all may
    # reach the destination before Retry-After has passed.
    fake_destination.script = [status(429, "slow down", {"Retry-After": "1"})]
    client = await gateway_client(destinations=[webhook("Hook", fake_destination.url, concurrency=1,
                                                        batch={"max_calls": 1})])
    await send_batch(client, [track(f"m-{i}") for i in range(3)])
    reqs = await fake_destination.wait_requests(4)
    first, rest = reqs[0], reqs[1:]
    assert first.status == 429 and first.json["batch"][0]["messageId"] == "m-0"
    assert min(r.t for r in rest) - first.t >= 1.0, [round(r.t - first.t, 3) for r in rest]
    await fake_destination.wait_quiet()
    assert len(fake_destination.requests) == 4
    assert sorted(c["messageId"] for c in fake_destination.delivered()) == ["m-0", "m-1", "m-2"]
    # The fake sees a call before the gateway has its answer (and counts it).
    await wait_metric(client, "gateway_destination_delivered_total", lambda v: v == 3,
                      destination="Hook")
    ms = await metrics(client)
    # Only the call that got the 429 was attempted and retried; the others waited.
    assert sample(ms, "gateway_destination_retried_total", destination="Hook") == 1
    assert sample(ms, "gateway_destination_delivered_total", destination="Hook") == 3


async def test_retry_after_http_date(gateway_client: Any, fake_destination: FakeDestination) -> None:
    when = time.time() + 2
    date = email.utils.formatdate(when, usegmt=True)
    not_before = email.utils.parsedate_to_datetime(date).timestamp()  # whole seconds
    fake_destination.script = [status(503, "maintenance", {"Retry-After": date})]
    client = await gateway_client(destinations=[webhook("Hook", fake_destination.url)])
    await send(client, track("m-1"))
    reqs = await fake_destination.wait_requests(2)
    assert reqs[0].status == 503 and reqs[1].status == 200
    assert reqs[1].wall >= not_before, f"resent {not_before - reqs[1].wall:.3f}s before the Retry-After date"
    assert [c["messageId"] for c in fake_destination.delivered()] == ["m-1"]


async def test_timeout_is_retried(gateway_client: Any, fake_destination: FakeDestination) -> None:
    fake_destination.script = [sleep_then(fake_destination, 3.0)]
    client = await gateway_client(destinations=[webhook("Hook", fake_destination.url, timeout=0.3)])
    sent = time.monotonic()  # before the first send began, so before its 0.3 s were counted
    await send(client, track("m-1"))
    reqs = await fake_destination.wait_requests(2)
    # The first send gave up at 0.3 s (counted from before it connected), long before its 3 s answer.
    assert reqs[0].status is None
    assert reqs[1].t - sent >= 0.3 and reqs[1].t - reqs[0].t < 2.0
    await wait_until(lambda: fake_destination.delivered(), what="the retry to be answered")
    assert [c["messageId"] for c in fake_destination.delivered()] == ["m-1"]
    # The fake sees a call before the gateway has its answer (and counts it).
    await wait_metric(client, "gateway_destination_delivered_total", lambda v: v == 1,
                      destination="Hook")
    ms = await metrics(client)
    assert sample(ms, "gateway_destination_requests_total", destination="Hook", result="network_error") == 1
    assert sample(ms, "gateway_destination_retried_total", destination="Hook") == 1
    assert sample(ms, "gateway_destination_delivered_total", destination="Hook") == 1


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
async def test_dropped_connection_is_retried(gateway_client: Any, fake_destination: FakeDestination, tmp_path: Path,
                                             reset: bool) -> None:
    fake_destination.script = [drop_connection(reset=reset)]
    client = await gateway_client(destinations=[webhook("Hook", fake_destination.url)])
    await send(client, track("m-1"))
    reqs = await fake_destination.wait_requests(2)
    assert reqs[0].status is None and reqs[1].status == 200
    assert [c["messageId"] for c in fake_destination.delivered()] == ["m-1"]
    ms = await metrics(client)
    assert sample(ms, "gateway_destination_requests_total", destination="Hook", result="network_error") == 1
    assert sample(ms, "gateway_destination_retried_total", destination="Hook") == 1
    assert dead_letters(tmp_path) == []


# -- outcomes per call ---------------------------------------------------------------

def itemized_answers() -> Action:
    """The fake API of tests/plugins/itemized_destination.py: 207 with one result
    per item; ``flaky`` items fail with 503 the first time they are seen."""
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


def itemized(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {**webhook(name, url, **extra), "type": "itemized", "settings": {"endpoint": url}}


async def test_per_item_outcomes(gateway_client: Any, fake_destination: FakeDestination, tmp_path: Path,
                                 test_plugins: Path) -> None:
    fake_destination.default = itemized_answers()
    client = await gateway_client(destinations=[itemized("Items", fake_destination.url)],
                                  plugins=["itemized_destination"])
    calls = [track("ok-1"), track("bad-1", properties={"behave": "fail"}),
             track("flaky-1", properties={"behave": "flaky"}), track("unmappable-1", event="Unmappable"),
             track("ok-2")]
    await send_batch(client, calls)
    reqs = await fake_destination.wait_requests(2)
    # One batch with every mappable call, then a retry of the flaky one only.
    assert [i["id"] for i in reqs[0].json["items"]] == ["ok-1", "bad-1", "flaky-1", "ok-2"]
    assert [i["id"] for i in reqs[1].json["items"]] == ["flaky-1"]
    await fake_destination.wait_quiet()
    assert len(fake_destination.requests) == 2
    dead = {d.message_id: d for d in dead_letters(tmp_path)}
    assert set(dead) == {"bad-1", "unmappable-1"}
    bad = dead["bad-1"]
    assert (bad.destination, bad.status, bad.reason, bad.body, bad.attempts) == \
        ("Items", 422, "item 422: email of bad-1 is not an email", "email of bad-1 is not an email", 1)
    assert msgspec.json.decode(bad.data)["messageId"] == "bad-1"
    unm = dead["unmappable-1"]
    assert (unm.status, unm.reason, unm.attempts) == (None, "UNMAPPABLE: this API takes no event named Unmappable", 0)
    # The fake sees a call before the gateway has its answer (and counts it).
    await wait_metric(client, "gateway_destination_delivered_total", lambda v: v == 3,
                      destination="Items")
    ms = await metrics(client)
    assert sample(ms, "gateway_destination_delivered_total", destination="Items") == 3
    assert sample(ms, "gateway_destination_retried_total", destination="Items") == 1
    assert sample(ms, "gateway_destination_dead_letters_total", destination="Items", reason="http_422") == 1
    assert sample(ms, "gateway_destination_dead_letters_total", destination="Items", reason="UNMAPPABLE") == 1


async def test_permanent_4xx_is_dead_lettered_with_status_reason_and_body(gateway_client: Any,
                                                                          fake_destination: FakeDestination,
                                                                          tmp_path: Path) -> None:
    answer = "invalid payload: " + "x" * 1000
    fake_destination.default = status(400, answer)
    client = await gateway_client(destinations=[webhook("Hook", fake_destination.url)])
    await send(client, track("m-1"))
    await fake_destination.wait_requests(1)
    got = await wait_until(lambda: dead_letters(tmp_path), what="a dead letter")
    await fake_destination.wait_quiet()
    assert len(fake_destination.requests) == 1, "a permanent failure is never retried"
    [d] = got
    assert (d.destination, d.message_id, d.status, d.reason, d.attempts, d.source) == \
        ("Hook", "m-1", 400, "HTTP 400", 1, "web")
    assert d.body == answer[:500]
    assert msgspec.json.decode(d.data) == fake_destination.requests[0].json["batch"][0]
    ms = await metrics(client)
    assert sample(ms, "gateway_destination_dead_letters_total", destination="Hook", reason="http_400") == 1
    assert sample(ms, "gateway_destination_retried_total", destination="Hook") == 0
    assert sample(ms, "gateway_destination_delivered_total", destination="Hook") == 0


# -- giving up -------------------------------------------------------------------------

async def test_gives_up_after_max_attempts(gateway_client: Any, fake_destination: FakeDestination,
                                           tmp_path: Path) -> None:
    fake_destination.default = status(500, "still broken")
    client = await gateway_client(destinations=[webhook("Hook", fake_destination.url,
                                                        retry={"max_attempts": 3, "max_age": 0})])
    await send(client, track("m-1"))
    got = await wait_until(lambda: dead_letters(tmp_path), what="a dead letter")
    await fake_destination.wait_quiet()
    assert [r.status for r in fake_destination.requests] == [500, 500, 500]
    [d] = got
    assert (d.message_id, d.status, d.body, d.attempts) == ("m-1", 500, "still broken", 3)
    assert d.reason.startswith("gave up after 3 attempts over ") and d.reason.endswith("; last: HTTP 500")
    assert spool_query(tmp_path, "SELECT count(*) FROM retries") == [(0,)]
    ms = await metrics(client)
    assert sample(ms, "gateway_destination_dead_letters_total", destination="Hook", reason="retries_exhausted") == 1
    assert sample(ms, "gateway_destination_retried_total", destination="Hook") == 2


async def test_gives_up_after_max_age(gateway_client: Any, fake_destination: FakeDestination, tmp_path: Path) -> None:
    fake_destination.default = status(502)
    client = await gateway_client(destinations=[webhook("Hook", fake_destination.url,
                                                        retry={"max_attempts": 1, "max_age": 0.8})])
    await send(client, track("m-1"))
    [d] = await wait_until(lambda: dead_letters(tmp_path), what="a dead letter")
    first = fake_destination.requests[0].wall
    assert d.at - first >= 0.8, "not given up before max_age"
    assert d.at - first < 3.0
    assert d.attempts == len(fake_destination.requests) >= 4  # backoff is at most 0.2 s
    assert d.reason.startswith(f"gave up after {d.attempts} attempts")


async def test_gives_up_only_when_both_count_and_window_are_spent(gateway_client: Any,
                                                                  fake_destination: FakeDestination,
                                                                  tmp_path: Path) -> None:
    # README.md: "give up after both a time window and a count".
    fake_destination.default = status(503)
    client = await gateway_client(destinations=[
        webhook("Long", fake_destination.url, retry={"max_attempts": 2, "max_age": 0.8}),
    ])
    await send(client, track("m-1"))
    [d] = await wait_until(lambda: dead_letters(tmp_path), what="a dead letter")
    assert d.attempts > 2, "the count alone must not give up while the window is open"
    assert d.at - fake_destination.requests[0].wall >= 0.8


# -- Paused ------------------------------------------------------------------------------

async def test_paused_keeps_calls_queued(gateway_client: Any, fake_destination: FakeDestination, tmp_path: Path,
                                         test_plugins: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery_sender, "PAUSE_MIN", 0.3)
    fake_destination.script = [status(401, "bad token"), status(401, "bad token")]
    fake_destination.default = itemized_answers()
    client = await gateway_client(destinations=[itemized("Items", fake_destination.url)],
                                  plugins=["itemized_destination"])
    await send_batch(client, [track("m-1"), track("m-2")])
    await fake_destination.wait_requests(2)
    # Paused (the second pause lasts 0.6 s): the calls stay queued in the spool,
    # in order, behind the destination's read position; no attempt is counted
    # and nothing is dead-lettered or moved to the retries table.
    await wait_metric(client, "gateway_destination_paused", lambda v: v == 1, timeout=0.5, destination="Items")
    assert spool_query(tmp_path, "SELECT count(*) FROM retries") == [(0,)]
    [(cursor,)] = spool_query(tmp_path, "SELECT seq FROM cursors WHERE destination = 'Items'")
    assert [r[0] for r in spool_query(tmp_path, "SELECT seq FROM events")] == [cursor // (1 << 20) + 1]
    assert dead_letters(tmp_path) == []
    reqs = await fake_destination.wait_requests(3)
    assert reqs[1].t - reqs[0].t >= 0.3 and reqs[2].t - reqs[1].t >= 0.6, "the pause doubles"
    assert [[i["id"] for i in r.json["items"]] for r in reqs] == [["m-1", "m-2"]] * 3
    assert reqs[2].status == 207
    await wait_metric(client, "gateway_destination_paused", lambda v: v == 0, timeout=1, destination="Items")
    # The fake sees a call before the gateway has its answer (and counts it).
    await wait_metric(client, "gateway_destination_delivered_total", lambda v: v == 2,
                      destination="Items")
    ms = await metrics(client)
    assert sample(ms, "gateway_destination_delivered_total", destination="Items") == 2
    assert sample(ms, "gateway_destination_retried_total", destination="Items") == 0
    assert dead_letters(tmp_path) == []
    await wait_until(lambda: spool_query(tmp_path, "SELECT count(*) FROM retries") == [(0,)], timeout=2,
                     what="the retries table to be emptied")


# -- independence, order, metrics ------------------------------------------------------

async def test_a_hung_destination_slows_neither_another_nor_ingest(gateway_client: Any,
                                                                   make_fake_destination: Any) -> None:
    down, up = await make_fake_destination(), await make_fake_destination()
    release = asyncio.Event()
    down.default = hang_until(down, release)
    client = await gateway_client(destinations=[
        webhook("Down", down.url, timeout=20),
        webhook("Up", up.url),
    ])
    await send(client, track("m-0"))
    await down.wait_requests(1)  # Down's worker is now stuck in a send
    slowest = 0.0
    for i in range(1, 40):
        t = time.monotonic()
        await send(client, track(f"m-{i}"))
        slowest = max(slowest, time.monotonic() - t)
    assert slowest < 2.0, f"an ingest request took {slowest:.2f}s (Down's send hangs for 20 s)"
    await wait_until(lambda: len(up.delivered()) >= 40, timeout=5, what="Up to get every call")
    assert [c["messageId"] for c in up.delivered()] == [f"m-{i}" for i in range(40)]
    assert down.delivered() == [] and all(r.status is None for r in down.requests)
    release.set()
    await wait_until(lambda: len(down.delivered()) >= 40, timeout=5, what="Down to catch up")
    assert sorted(c["messageId"] for c in down.delivered()) == sorted(f"m-{i}" for i in range(40))


async def test_order_is_kept_for_one_destination(gateway_client: Any, fake_destination: FakeDestination) -> None:
    client = await gateway_client(destinations=[webhook("Hook", fake_destination.url, concurrency=1,
                                                        batch={"max_calls": 7})])
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


async def test_backlog_and_oldest_pending_age(gateway_client: Any, fake_destination: FakeDestination) -> None:
    release = asyncio.Event()
    fake_destination.script = [hang_until(fake_destination, release)]
    client = await gateway_client(destinations=[webhook("Hook", fake_destination.url, timeout=20)])
    started = time.monotonic()
    await send(client, track("m-0"))
    await fake_destination.wait_requests(1)
    for i in range(1, 6):
        await send(client, track(f"m-{i}"))
    # Nothing is acknowledged while the first send hangs: six calls wait.
    await wait_metric(client, "gateway_destination_backlog", lambda v: v == 6, destination="Hook")
    age = await wait_metric(client, "gateway_destination_oldest_pending_age_seconds", lambda v: (v or 0) >= 1.0,
                            destination="Hook")
    assert age is not None and age <= time.monotonic() - started + 0.5
    release.set()
    await wait_until(lambda: len(fake_destination.delivered()) == 6, what="every call")
    await wait_metric(client, "gateway_destination_backlog", lambda v: v == 0, destination="Hook")
    await wait_metric(client, "gateway_destination_oldest_pending_age_seconds", lambda v: v == 0,
                      destination="Hook")
    # The fake sees a call before the gateway has its answer (and counts it).
    await wait_metric(client, "gateway_destination_delivered_total", lambda v: v == 6,
                      destination="Hook")
    ms = await metrics(client)
    assert sample(ms, "gateway_destination_delivered_total", destination="Hook") == 6
    assert sample(ms, "gateway_destination_retry_backlog", destination="Hook") == 0


async def test_a_failing_destination_keeps_its_backlog_in_the_spool(gateway_client: Any,
                                                                    fake_destination: FakeDestination) -> None:
    """A whole batch failing means the destination is down: the calls stay in
    the spool, in order, behind the read position (not one retry row each)."""
    fake_destination.default = status(503, headers={"Retry-After": "60"})
    client = await gateway_client(destinations=[webhook("Hook", fake_destination.url)])
    await send_batch(client, [track("m-1"), track("m-2")])
    await fake_destination.wait_requests(1)
    await wait_metric(client, "gateway_destination_backlog", lambda v: v == 2, destination="Hook")
    ms = await metrics(client)
    assert sample(ms, "gateway_destination_retry_backlog", destination="Hook") == 0
    assert sample(ms, "gateway_destination_retried_total", destination="Hook") == 2
    assert (sample(ms, "gateway_destination_oldest_pending_age_seconds", destination="Hook") or 0) > 0
    assert len(fake_destination.requests) == 1


async def test_calls_stored_after_the_spool_was_purged_are_delivered(gateway_client: Any,
                                                                     fake_destination: FakeDestination,
                                                                     tmp_path: Path) -> None:
    # The purge empties the events table once every destination has read it;
    # SQLite must not then hand out seqs the cursors have already passed.
    client = await gateway_client(destinations=[webhook("Hook", fake_destination.url)])
    await send_batch(client, [track("m-1"), track("m-2")])
    await wait_until(lambda: len(fake_destination.delivered()) == 2, what="two calls")
    await wait_until(lambda: spool_query(tmp_path, "SELECT count(*) FROM events") == [(0,)], timeout=5,
                     what="the purge (every 2 s) to empty the events table")
    await send(client, track("m-3"))
    await wait_until(lambda: len(fake_destination.delivered()) == 3, timeout=5, what="the call stored after the purge")
    assert [c["messageId"] for c in fake_destination.delivered()] == ["m-1", "m-2", "m-3"]
