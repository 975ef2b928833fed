"""Deduplication by messageId on NATS JetStream (README "Delivery
guarantees", "Scaling out on NATS JetStream"): across every gateway process
on one stream, durably across SIGKILL, as on SQLite (tests/test_dedup.py).

Each stored call's messageId has a marker in the calls stream, written in
the atomic batch of its call: the stream, not a gateway, says whether an id
was stored."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import msgspec
import pytest

from gateway.testing import AUTH_HEADERS, GatewayProcess, track, wait_until
from nats_servers import NatsCluster, delete_streams, nats_config, open_nats_spool, prefix


@pytest.fixture
async def stream(nats_node: NatsCluster) -> AsyncIterator[str]:
    name = prefix()
    yield name
    await delete_streams(nats_node.urls, name)


async def stored_ids(node: NatsCluster, stream: str) -> list[str]:
    """The messageIds of every call in the stream, in order."""
    async with open_nats_spool(node.urls, stream, keep=True) as spool:
        return [msgspec.json.decode(r.data)["messageId"] for r in await spool.read(0, 100_000)]


async def _post_all(url: str, calls: list[dict[str, Any]], answered: dict[str, int]) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for call in calls:
            try:
                async with http.post(f"{url}/v1/track", json=call, headers=AUTH_HEADERS) as resp:
                    answered[call["messageId"]] = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return


async def metric(gw: GatewayProcess, name: str) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_two_gateways_store_a_message_id_once(gateway_process: Any, nats_node: NatsCluster,
                                                    stream: str) -> None:
    storage = nats_config(nats_node.urls, stream, retention=3600)
    one = await gateway_process(storage=storage)
    two = await gateway_process(storage=storage)
    calls = [track(f"n-{i}") for i in range(50)]
    a: dict[str, int] = {}
    b: dict[str, int] = {}
    # Both gateways get every call, at the same time: each id is claimed in the stream once.
    await asyncio.gather(_post_all(one.url, calls, a), _post_all(two.url, calls, b))
    assert set(a.values()) == set(b.values()) == {200}
    ids = await stored_ids(nats_node, stream)
    assert sorted(ids) == sorted(c["messageId"] for c in calls), "each call once, whichever gateway stored it"
    dedup = await metric(one, "gateway_calls_deduplicated_total") + await metric(two, "gateway_calls_deduplicated_total")
    accepted = await metric(one, "gateway_calls_accepted_total") + await metric(two, "gateway_calls_accepted_total")
    assert (accepted, dedup) == (50, 50)
    # Without a messageId nothing is left out.
    async with aiohttp.ClientSession() as s:
        for gw in (one, two):
            async with s.post(gw.url + "/v1/track", headers=AUTH_HEADERS, json={"userId": "u", "event": "E"}) as r:
                assert r.status == 200
    assert len(await stored_ids(nats_node, stream)) == 52


async def test_resent_after_sigkill_every_call_is_stored_exactly_once(gateway_process: Any, nats_node: NatsCluster,
                                                                      stream: str) -> None:
    storage = nats_config(nats_node.urls, stream, retention=3600)
    gw = await gateway_process(storage=storage)
    calls = [track(f"k-{i}") for i in range(1200)]
    answered: dict[str, int] = {}
    senders = [asyncio.ensure_future(_post_all(gw.url, calls[k::4], answered)) for k in range(4)]
    await wait_until(lambda: len(answered) >= 200, what="200 answers before the kill", timeout=20)
    gw.kill()
    await asyncio.gather(*senders)
    ok = {mid for mid, st in answered.items() if st == 200}
    assert ok and set(answered.values()) <= {200, 503}, set(answered.values())
    assert ok <= set(await stored_ids(nats_node, stream)), "every call answered 200 is stored"
    gw = await gateway_process(storage=storage)
    resent: dict[str, int] = {}
    await _post_all(gw.url, calls, resent)
    assert set(resent.values()) == {200}
    ids = await stored_ids(nats_node, stream)
    assert sorted(ids) == sorted(c["messageId"] for c in calls), "every call once, none twice, none lost"


async def test_a_window_of_0_switches_it_off(gateway_process: Any, nats_node: NatsCluster, stream: str) -> None:
    gw = await gateway_process(storage={**nats_config(nats_node.urls, stream, retention=3600), "dedup_window": 0})
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(gw.url + "/v1/track", headers=AUTH_HEADERS, json=track("same")) as r:
                assert r.status == 200
    assert await stored_ids(nats_node, stream) == ["same"] * 3


async def test_past_the_window_an_id_is_stored_again(gateway_process: Any, nats_node: NatsCluster,
                                                    stream: str) -> None:
    """A marker expires with the window (its own TTL): the stream forgets the id."""
    gw = await gateway_process(storage={**nats_config(nats_node.urls, stream, retention=3600), "dedup_window": "1s"})
    async with aiohttp.ClientSession() as s:
        async def send() -> None:
            async with s.post(gw.url + "/v1/track", headers=AUTH_HEADERS, json=track("again")) as r:
                assert r.status == 200

        await send()
        await send()
        assert await stored_ids(nats_node, stream) == ["again"], "within the window: once"

        async def stored_twice() -> bool:
            await send()
            return len(await stored_ids(nats_node, stream)) >= 2
        await wait_until(stored_twice, what="the id to be stored again past its window", timeout=15, poll=0.5)
    assert await stored_ids(nats_node, stream) == ["again", "again"]
