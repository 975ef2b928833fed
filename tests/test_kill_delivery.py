"""A real ``gateway serve`` killed while it delivers: SIGKILL loses nothing
that was answered 200 (at least once, after a restart); SIGTERM stops
accepting, lets the send in flight finish within server.shutdown_timeout,
starts no new one, exits 0, and the rest is delivered after a restart."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections import Counter
from typing import Any

import aiohttp

from gateway.testing import AUTH_HEADERS, FakeDestination, sleep_then, track, wait_until, webhook


async def post_until_stopped(url: str, acked: list[str], stop: asyncio.Event, limit: int) -> None:
    """Post singles and batches of 5 until ``stop`` or ``limit`` calls; record
    each messageId answered 200.  A request that fails is not counted."""
    n = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while not stop.is_set() and n < limit:
            if n % 2:
                calls = [track(f"c-{n + i}") for i in range(5)]
                path, doc = "/v1/batch", {"batch": calls}
            else:
                calls = [track(f"c-{n}")]
                path, doc = "/v1/track", calls[0]
            n += len(calls)
            try:
                async with http.post(url + path, json=doc, headers=AUTH_HEADERS) as r:
                    if r.status == 200:
                        acked.extend(c["messageId"] for c in calls)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return
            await asyncio.sleep(0.005)


async def test_sigkill_while_delivering_loses_nothing_answered_200(gateway_process: Any,
                                                                   fake_destination: FakeDestination) -> None:
    fake_destination.default = sleep_then(fake_destination, 0.1)  # a slow destination
    cfg = dict(destinations=[webhook("Hook", fake_destination.url, concurrency=2, batch={"max_calls": 5})])
    gw = await gateway_process(**cfg)
    acked: list[str] = []
    stop = asyncio.Event()
    poster = asyncio.create_task(post_until_stopped(gw.url, acked, stop, limit=600))
    # Kill it once it is both ingesting and delivering.
    await wait_until(lambda: len(fake_destination.delivered()) >= 20 and len(acked) >= 60, timeout=15,
                     what="delivery to be under way")
    gw.kill()
    stop.set()
    await asyncio.wait_for(poster, 10)
    before = {c["messageId"] for c in fake_destination.delivered()}
    assert len(before) < len(acked), "the kill came too late to prove anything"

    await gateway_process(**cfg)  # the same spool
    want = set(acked)
    await wait_until(lambda: want <= {c["messageId"] for c in fake_destination.delivered()}, timeout=30,
                     what="every call answered 200 to be delivered")
    await fake_destination.wait_quiet()  # a duplicate would come within it
    got = Counter(c["messageId"] for c in fake_destination.delivered())
    assert want <= set(got)
    # Only calls that were posted arrive; a call is sent twice only when it
    # was delivered before the kill but not yet acknowledged in the spool.
    assert {m for m in got if not m.startswith("c-")} == set()
    twice = {m for m, n in got.items() if n > 1}
    assert twice <= before and max(got.values()) <= 2


async def test_sigterm_finishes_the_send_in_flight_and_stops(gateway_process: Any,
                                                             fake_destination: FakeDestination) -> None:
    fake_destination.default = sleep_then(fake_destination, 1.5)
    cfg = dict(destinations=[webhook("Hook", fake_destination.url, concurrency=1, batch={"max_calls": 5})],
               server={"shutdown_timeout": 5})
    gw = await gateway_process(**cfg)
    ids = [f"t-{i}" for i in range(20)]
    async with aiohttp.ClientSession() as http:
        # One request: one read window of four batches, sent one at a time.
        async with http.post(f"{gw.url}/v1/batch", json={"batch": [track(m) for m in ids]},
                             headers=AUTH_HEADERS) as r:
            assert r.status == 200
    # the first batch is in flight (it takes 1.5 s); three wait their turn
    await fake_destination.wait_requests(1)
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)
    sent_at = time.monotonic()
    # It stops accepting at once, while it is still finishing the send.
    def refused() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", gw.port), 0.2):
                return False
        except OSError:
            return True

    await wait_until(refused, timeout=sent_at + 1.2 - time.monotonic(), poll=0.02,
                     what="new connections to be refused while the send finishes")
    assert gw.proc.poll() is None, "refuses new connections while the send finishes"
    await wait_until(lambda: gw.proc.poll() is not None, timeout=sent_at + 5 + 3 - time.monotonic(),
                     what="the exit within server.shutdown_timeout")
    assert gw.proc.returncode == 0
    log = gw.log.read_text()
    assert "gateway: stopping" in log and "gateway: stopped" in log
    # The send in flight was answered; nothing new was started after SIGTERM.
    assert [r.status for r in fake_destination.requests] == [200]
    assert [c["messageId"] for c in fake_destination.delivered()] == ids[:5]

    fake_destination.default = sleep_then(fake_destination, 0.05)
    await gateway_process(**cfg)  # restart: the rest, exactly once and in order
    await wait_until(lambda: len(fake_destination.delivered()) >= len(ids), timeout=20,
                     what="the rest after a restart")
    await fake_destination.wait_quiet()  # a duplicate would come within it
    assert [c["messageId"] for c in fake_destination.delivered()] == ids


async def test_sigterm_cuts_off_a_send_longer_than_the_shutdown_timeout(gateway_process: Any,
                                                                        fake_destination: FakeDestination) -> None:
    fake_destination.script = [sleep_then(fake_destination, 60)]  # answers only at teardown
    cfg = dict(destinations=[webhook("Hook", fake_destination.url, timeout=120)], server={"shutdown_timeout": 1})
    gw = await gateway_process(**cfg)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/v1/batch", json={"batch": [track("k-1"), track("k-2")]},
                             headers=AUTH_HEADERS) as r:
            assert r.status == 200
    await fake_destination.wait_requests(1)
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)
    sent_at = time.monotonic()
    await wait_until(lambda: gw.proc.poll() is not None, timeout=sent_at + 1 + 3 - time.monotonic(),
                     what="giving up the send at server.shutdown_timeout, and the exit")
    assert gw.proc.returncode == 0
    assert time.monotonic() - sent_at >= 0.9, "it waited for the send, up to the timeout"
    assert fake_destination.delivered() == []
    await gateway_process(**cfg)  # what was cut off is still queued
    await wait_until(lambda: len(fake_destination.delivered()) >= 2, timeout=10,
                     what="the cut-off calls after a restart")
    assert [c["messageId"] for c in fake_destination.delivered()] == ["k-1", "k-2"]
