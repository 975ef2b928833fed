"""Real ``gateway serve`` processes on real nats-servers (a 3-node cluster
on 127.0.0.1, or the session's single node), real HTTP in and out:

- two gateways under load; SIGKILL of a NATS node (the calls stream's
  leader) and then of one gateway while it sends: every call answered 200
  by either is delivered at least once, and what the killed gateway held
  reaches the destination through the other;
- no quorum: 503 with Retry-After (never a 200), /ready says why, and the
  same gateway takes calls again once the nodes are back;
- a gateway started before its cluster is whole waits for it;
- the consumers of a destination that left every config are deleted;
- ``gateway check``, ``dlq list|show|replay`` and ``replay`` on this backend,
  while the server runs.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import aiohttp
import msgspec
import pytest
import yaml

from gateway.testing import (
    AUTH_HEADERS, FakeDestination, GatewayProcess, ReceivedRequest, free_port, gateway_cli, gateway_config,
    sleep_then, status, track, wait_ready, wait_until, webhook,
)
from nats_servers import NatsCluster, delete_streams, js_api, nats_config, prefix


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Callable[..., Awaitable[GatewayProcess]]]:
    """``await gateways(name, **config)``: a ``gateway serve`` of its own
    config file; every one is killed at teardown."""
    started: list[GatewayProcess] = []

    async def start(name: str, **config: Any) -> GatewayProcess:
        path = tmp_path / f"{name}.yaml"
        path.write_text(gateway_config(tmp_path, **config))
        process = GatewayProcess(path, free_port())
        started.append(process)
        return await process.start(timeout=40)
    yield start
    for process in started:
        process.kill()


class Load:
    """Clients posting singles and batches of 5 to several gateways, recording
    each messageId answered 200, until stopped."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.acked: set[str] = set()
        self.statuses: Counter[int] = Counter()
        self.stop = asyncio.Event()
        self.n = 0

    async def client(self, k: int) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            i = 0
            while not self.stop.is_set():
                url = self.urls[(k + i) % len(self.urls)]
                size = 1 if i % 2 else 5
                ids = [f"c-{k}-{i}-{j}" for j in range(size)]
                i += 1
                path, doc = ("/v1/track", track(ids[0])) if size == 1 else \
                    ("/v1/batch", {"batch": [track(m) for m in ids]})
                try:
                    async with http.post(url + path, json=doc, headers=AUTH_HEADERS) as r:
                        self.statuses[r.status] += 1
                        if r.status == 200:
                            self.acked.update(ids)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    self.statuses[0] += 1  # a gateway that died, or a request cut off: not answered 200
                await asyncio.sleep(0.01)

    def run(self, clients: int = 6) -> asyncio.Future[Any]:
        return asyncio.gather(*(self.client(k) for k in range(clients)))


async def what_nats_holds(servers: list[str], stream: str, gw: GatewayProcess) -> str:
    """For a failure's message: the gateway's NATS series, the calls stream's
    consumers, and the end of the gateway's log."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/metrics") as r:
            text = await r.text()
    info = await js_api(servers, f"CONSUMER.LIST.{stream}_CALLS")
    return (f"gateway: {[x for x in text.splitlines() if 'nats' in x and not x.startswith('#')]}; "
            f"consumers: {info}; its log: {gw.log_tail(4000)}")


def calls_of(requests: list[ReceivedRequest], path: str, before: float = float("inf"),
             after: float = 0.0) -> list[str]:
    return [c["messageId"] for r in requests if r.path == path and after <= r.t < before
            for c in (r.json or {}).get("batch", [])]


async def test_two_gateways_lose_nothing_when_a_node_and_a_gateway_are_killed(
        gateways: Any, nats_cluster: NatsCluster, make_fake_destination: Any) -> None:
    fake: FakeDestination = await make_fake_destination()
    base = fake.url.rsplit("/", 1)[0]
    fake.default = sleep_then(fake, 0.05)
    stream = prefix()
    storage = nats_config(nats_cluster.urls, stream, replicas=3)
    # One consumer ("Hook"), shared; each gateway posts to a path of its own,
    # so that the fake tells who sent what.  Ack wait: 5 s (timeout 2 s).
    hook = {"concurrency": 2, "batch": {"max_calls": 10}, "timeout": 2}
    g1 = await gateways("g1", storage=storage, destinations=[webhook("Hook", f"{base}/g1", **hook)])
    g2 = await gateways("g2", storage=storage, destinations=[webhook("Hook", f"{base}/g2", **hook)])
    load = Load([g1.url, g2.url])
    running = load.run()
    try:
        await wait_until(lambda: len(fake.delivered()) >= 100 and len(load.acked) >= 200, timeout=20,
                         what="both gateways ingesting and delivering")
        # SIGKILL the node that leads the calls stream: a new leader, reconnections.
        info = await js_api(nats_cluster.urls, f"STREAM.INFO.{stream}_CALLS")
        leader = next(n for n in nats_cluster.nodes if n.name == info["cluster"]["leader"])
        leader.kill()
        killed_node_at = time.monotonic()

        async def consumer_led_elsewhere() -> bool:
            try:
                got = await js_api(nats_cluster.urls, f"CONSUMER.LIST.{stream}_CALLS")
            except Exception:  # noqa: BLE001 - the election is still on
                return False
            leaders = [(c.get("cluster") or {}).get("leader") for c in got.get("consumers") or ()]
            return bool(leaders) and all(x and x != leader.name for x in leaders)
        # Kill g1 only once the election is over: a consumer leader elected later
        # hands what g1 holds to g2 at once (their ack wait ran out meanwhile).
        await wait_until(consumer_led_elsewhere, timeout=30, what="the consumer to have a new leader", poll=0.25)
        settled = time.monotonic()
        await wait_until(lambda: {r.path for r in fake.requests if r.t > settled and r.status == 200} >= {"/g1", "/g2"},
                         timeout=30, what="both gateways delivering again after the election",
                         seen=lambda: [(r.path, r.status) for r in fake.requests[-8:]])
        # Make g1 hold calls in flight: its sends now take 3 s (g2's stay fast).
        slow_g1 = sleep_then(fake, 3.0)

        async def by_path(request: Any, req: ReceivedRequest) -> Any:
            return await (slow_g1 if req.path.endswith("/g1") else sleep_then(fake, 0.05))(request, req)
        fake.default = by_path
        slowed_at = time.monotonic()

        def g1_sending_new_calls() -> bool:
            """g1 has a send in flight (under 2.5 s old) of a call nobody delivered before."""
            before = {c["messageId"] for r in fake.requests if r.t < slowed_at and r.status == 200
                      for c in r.json["batch"]}
            return bool(set(calls_of(fake.requests, "/g1", after=max(slowed_at, time.monotonic() - 2.5))) - before)
        await wait_until(g1_sending_new_calls, timeout=30, what="g1 to be sending",
                         seen=lambda: (f"requests: {[(r.path, round(time.monotonic() - r.t, 1)) for r in fake.requests[-8:]]}"
                                       f"; g1's log: {g1.log_tail(1500)}"))
        await asyncio.sleep(0.3)
        g1.kill()
        killed_g1_at = time.monotonic()
        await asyncio.sleep(2.0)
    finally:
        load.stop.set()
        await asyncio.wait_for(running, 20)
    g1_path, g2_path = "/g1", "/g2"
    # What g1 was sending when it died: requests that arrived once its sends took 3 s, too late to be
    # answered before the kill.
    in_flight = set(calls_of(fake.requests, g1_path, before=killed_g1_at, after=max(slowed_at, killed_g1_at - 3.0)))
    # Not those g2 delivered before the kill (a delivery whose acknowledgement was lost in the
    # election, or a lease that ran out: at least once).
    in_flight -= {c["messageId"] for r in fake.requests if r.t < killed_g1_at and r.status == 200
                  and (r.path == g2_path or r.t < slowed_at) for c in r.json["batch"]}
    assert in_flight, "g1 had nothing in flight: the test proves nothing"
    want = set(load.acked)
    try:
        await wait_until(lambda: want <= {c["messageId"] for c in fake.delivered()}, timeout=40,
                         what="every call answered 200 to be delivered",
                         seen=lambda: f"{len(want - {c['messageId'] for c in fake.delivered()})} missing")
    except AssertionError as e:
        raise AssertionError(f"{e}; {await what_nats_holds(nats_cluster.urls, stream, g2)}") from None
    # One the fake answered after g1 died counts as delivered above; g2 sends it again once
    # g1's lease runs out (the ack wait), which can come later still: wait for that too.
    def via_g2() -> set[str]:
        return set(calls_of(fake.requests, g2_path, after=killed_g1_at))
    try:
        await wait_until(lambda: in_flight <= via_g2(), timeout=40, what="g1's calls in flight to come through g2",
                         seen=lambda: f"{len(in_flight - via_g2())} not yet")
    except AssertionError as e:
        missing = in_flight - via_g2()
        where = [(r.path, round(r.t - killed_g1_at, 2), r.status) for r in fake.requests
                 if any(c["messageId"] in missing for c in (r.json or {}).get("batch", []))]
        raise AssertionError(f"{e}; requests holding them (path, s after g1's kill, status): {where}; "
                             f"{await what_nats_holds(nats_cluster.urls, stream, g2)}") from None
    after_kill = via_g2()
    assert in_flight <= after_kill, "g1's calls in flight reached the destination through g2"
    got = Counter(c["messageId"] for c in fake.delivered())
    print(f"\nacked {len(want)}, statuses {dict(load.statuses)}, g1 in flight at its kill {len(in_flight)}, "
          f"delivered {len(got)} ({sum(got.values()) - len(got)} twice), via g2 after the kill {len(after_kill)}")
    assert all(m.startswith("c-") for m in got), "only calls that were posted arrive"
    assert load.statuses[200] > 0 and set(load.statuses) <= {0, 200, 503}, load.statuses
    # g2 came through the node's death without a restart, and says it is ready (a look at
    # the stream can time out while two nodes on a busy machine catch up: ask again).
    await wait_ready(g2.url, timeout=20)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{g2.url}/metrics") as r:
            text = await r.text()
    assert "gateway_nats_connected 1.0" in text
    assert time.monotonic() - killed_node_at < 120


async def test_no_quorum_is_a_503_and_the_gateway_comes_back_with_the_nodes(
        gateways: Any, nats_cluster: NatsCluster, fake_destination: FakeDestination) -> None:
    stream = prefix()
    # timeout 2 s: an ack wait of 5 s, for a delivery lost in the elections to come again soon
    gw = await gateways("gw", storage=nats_config(nats_cluster.urls, stream, replicas=3),
                        destinations=[webhook("Hook", fake_destination.url, timeout=2)])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        async with http.post(f"{gw.url}/v1/track", json=track("before"), headers=AUTH_HEADERS) as r:
            assert r.status == 200
        for n in nats_cluster.nodes[1:]:
            n.kill()
        started = time.monotonic()
        async with http.post(f"{gw.url}/v1/track", json=track("no-quorum"), headers=AUTH_HEADERS) as r:
            assert r.status == 503 and r.headers.get("Retry-After"), await r.text()
            assert "cannot store" in (await r.json())["error"]
        assert time.monotonic() - started < 10

        async def not_ready() -> str | None:
            async with http.get(f"{gw.url}/ready") as r:
                return await r.text() if r.status == 503 else None
        why = await wait_until(not_ready, timeout=10, what="/ready to say 503")
        assert "not writable" in why
        for n in nats_cluster.nodes[1:]:
            n.start()

        async def accepted() -> bool:
            async with http.post(f"{gw.url}/v1/track", json=track("after"), headers=AUTH_HEADERS) as r:
                return r.status == 200
        await wait_until(accepted, timeout=40, poll=0.5, what="a 200 once the nodes are back")
        await wait_ready(gw.url, timeout=10, poll=0.05)
    try:
        await wait_until(lambda: {"before", "after"} <= {c["messageId"] for c in fake_destination.delivered()},
                         timeout=30, what="the calls answered 200 to be delivered")
    except AssertionError as e:
        raise AssertionError(f"{e}; delivered {[c['messageId'] for c in fake_destination.delivered()]}; "
                             f"{await what_nats_holds(nats_cluster.urls, stream, gw)}") from None


async def test_a_gateway_started_before_the_cluster_is_whole_waits_for_it(
        gateways: Any, tmp_path: Path, fake_destination: FakeDestination) -> None:
    """Three replicas, and the third node not up yet (a cluster and its
    gateways brought up together): JetStream refuses to place the streams
    ("no suitable peers"), which the node's arrival cures, so the gateway
    tries again instead of exiting, and starts once the node is there."""
    (tmp_path / "nats").mkdir()
    cluster = NatsCluster(tmp_path / "nats", 3)
    try:
        for n in cluster.nodes[:2]:
            n.start()
        cluster.wait_healthy(nodes=cluster.nodes[:2])
        starting = asyncio.create_task(gateways("gw", storage=nats_config(cluster.urls, prefix(), replicas=3),
                                                destinations=[webhook("Hook", fake_destination.url)]))
        await asyncio.sleep(4)
        assert not starting.done(), ("the gateway started (or exited) before the third node: "
                                     f"{starting.result().log_tail(20_000) if starting.done() else ''}")
        cluster.nodes[2].start()
        gw = await starting
        log = gw.log_tail(20_000)
        assert "no suitable peers" in log and "trying again" in log, log
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            async with http.post(f"{gw.url}/v1/track", json=track("after"), headers=AUTH_HEADERS) as r:
                assert r.status == 200, await r.text()
        await wait_until(lambda: "after" in {c["messageId"] for c in fake_destination.delivered()},
                         timeout=20, what="the call to be delivered")
    finally:
        cluster.stop()


async def test_the_consumers_of_a_removed_destination_are_deleted(gateways: Any, nats_node: NatsCluster,
                                                                  make_fake_destination: Any) -> None:
    """Gateway 1 has A and B, gateway 2 only A (cleanup_after 2 s): B stays
    while gateway 1 runs, and goes about cleanup_after after it stopped."""
    a, b = await make_fake_destination(), await make_fake_destination()
    stream = prefix()
    try:
        storage = nats_config(nats_node.urls, stream, cleanup_after=2.0)
        g1 = await gateways("g1", storage=storage,
                                 destinations=[webhook("A", a.url), webhook("B", b.url)])
        g2 = await gateways("g2", storage=storage, destinations=[webhook("A", a.url)])
        assert await destinations(nats_node, stream) == ["A", "B"]
        await asyncio.sleep(5)  # g2 has run past cleanup_after; g1 marks B as seen
        assert await destinations(nats_node, stream) == ["A", "B"], "B is in a running gateway's config"
        assert await asyncio.to_thread(g1.terminate, 15) == 0
        stopped = time.monotonic()

        async def only_a() -> bool:
            return await destinations(nats_node, stream) == ["A"]
        await wait_until(only_a, timeout=15, poll=0.5, what="B's consumers to be deleted")
        assert time.monotonic() - stopped >= 1.0
        assert "deleted the consumer" in g2.log_tail(20_000)
        g2.kill()
    finally:
        await delete_streams(nats_node.urls, stream)


async def destinations(c: NatsCluster, stream: str) -> list[str]:
    got = []
    for s in ("CALLS", "RETRIES"):
        resp = await js_api(c.urls, f"CONSUMER.LIST.{stream}_{s}")
        got.append(sorted(x["config"]["metadata"]["gateway_destination"] for x in resp["consumers"]))
    assert got[0] == got[1], got
    return got[0]


def listing(out: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for line in out.splitlines():
        _id, mid, dest, code, _when, reason = line.split("\t")
        rows.append((mid, dest, code, reason))
    return sorted(rows)


async def test_check_dlq_and_replay_on_nats_while_the_server_runs(gateways: Any, nats_node: NatsCluster,
                                                                  fake_destination: FakeDestination) -> None:
    stream = prefix()
    try:
        fake_destination.default = status(400, '{"error": "invalid field: traits"}')
        gw = await gateways("gw", storage=nats_config(nats_node.urls, stream, retention=3600),
                                 destinations=[webhook("Hook", fake_destination.url)])
        cfg = str(gw.config_path)
        rc, out, err = await gateway_cli("check", "--config", cfg)
        assert rc == 0 and f"NATS JetStream {stream}_CALLS" in out, (out, err)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{gw.url}/v1/batch", json={"batch": [track("m-1"), track("m-2")]},
                                 headers=AUTH_HEADERS) as r:
                assert r.status == 200

        async def listed() -> list[tuple[str, str, str, str]]:
            rc, out, err = await gateway_cli("dlq", "list", "--config", cfg)
            assert rc == 0, err
            return listing(out)
        want = [("m-1", "Hook", "400", "HTTP 400"), ("m-2", "Hook", "400", "HTTP 400")]
        await wait_until(lambda: _equal(listed(), want), timeout=15, what="two dead letters")
        rc, out, err = await gateway_cli("dlq", "show", "--config", cfg, "--id", "m-2")
        assert rc == 0, err
        [shown] = msgspec.json.decode(out)
        assert (shown["destination"], shown["message_id"], shown["status"], shown["attempts"], shown["source"]) == \
            ("Hook", "m-2", 400, 1, "web")
        assert shown["body"] == '{"error": "invalid field: traits"}' and shown["data"]["messageId"] == "m-2"

        fake_destination.default = status(200)
        rc, out, err = await gateway_cli("dlq", "replay", "--config", cfg, "--id", "m-2")
        assert (rc, out.strip()) == (0, "replayed 1 dead letter(s): queued for delivery now"), err
        await wait_until(lambda: [c["messageId"] for c in fake_destination.delivered()] == ["m-2"], timeout=10,
                         what="m-2 replayed")
        assert await listed() == want[:1]
        # gateway replay: the calls the stream retains (storage.retention), queued again.
        rc, out, err = await gateway_cli("replay", "--config", cfg, "--destination", "Hook", "--since", "1h")
        assert rc == 0 and "queued 2 call(s)" in out, (out, err)
        await wait_until(lambda: sorted(c["messageId"] for c in fake_destination.delivered()) == ["m-1", "m-2", "m-2"],
                         timeout=10, what="the replayed calls")
        rc, out, err = await gateway_cli("dlq", "replay", "--config", cfg, "--id", "no-such-id")
        assert rc == 1
    finally:
        await delete_streams(nats_node.urls, stream)


async def _equal(got: Any, want: Any) -> bool:
    return await got == want


async def test_gateways_started_at_once_share_one_set_of_streams_and_consumers(
        tmp_path: Path, nats_node: NatsCluster, fake_destination: FakeDestination) -> None:
    stream = prefix()
    started: list[GatewayProcess] = []
    try:
        storage = nats_config(nats_node.urls, stream)
        paths = []
        for i in range(3):
            p = tmp_path / f"g{i}.yaml"
            p.write_text(gateway_config(tmp_path, storage=storage, destinations=[webhook("Hook", fake_destination.url)]))
            paths.append(p)
        procs = [GatewayProcess(p, free_port()) for p in paths]
        started.extend(procs)
        await asyncio.gather(*(p.start(timeout=40) for p in procs))
        assert await destinations(nats_node, stream) == ["Hook"]
        async with aiohttp.ClientSession() as http:
            for i, p in enumerate(procs):
                async with http.post(f"{p.url}/v1/track", json=track(f"m-{i}"), headers=AUTH_HEADERS) as r:
                    assert r.status == 200
        await wait_until(lambda: sorted(c["messageId"] for c in fake_destination.delivered()) == ["m-0", "m-1", "m-2"],
                         what="each call once")
        await asyncio.sleep(1.5)
        assert len(fake_destination.delivered()) == 3
    finally:
        for p in started:
            p.kill()
        await delete_streams(nats_node.urls, stream)


def test_a_gateway_that_cannot_reach_nats_exits_with_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from gateway.testing import child_env

    path = tmp_path / "c.yaml"
    storage = {"backend": "nats", "nats": {"servers": [f"nats://127.0.0.1:{free_port()}"], "replicas": 1}}
    path.write_text(yaml.safe_dump({"storage": storage}))
    done = subprocess.run([sys.executable, "-c", "import gateway.spool.nats as n; n.OPEN_TIMEOUT = 2; "
                           "import sys; from gateway.cli import main; sys.exit(main(sys.argv[1:]))",
                           "serve", "--config", str(path), "--port", str(free_port())],
                          capture_output=True, text=True, env=child_env(), timeout=30)
    assert done.returncode == 1, done
    assert "cannot start: cannot reach NATS at nats://127.0.0.1:" in done.stderr
