"""``gateway serve --workers N`` (README.md, "Every core: --workers"): N
real server processes on one port, one spool.

Every worker stores through the first worker's spool writer (one group
commit for all), so a 200 from any of them is the same promise; delivery
runs once; /metrics and /ready answer for every worker whichever one a
scrape reaches; SIGKILL of a worker loses no acknowledged call and the
worker is started again; SIGTERM drains every worker and exits 0."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.testing import AUTH_HEADERS, GatewayProcess, gateway_cli, gateway_config, wait_until
from test_crash import Load, archive_config, delivered, wait_delivered, wait_gone

WORKERS = 3


def worker_pids(gw: GatewayProcess) -> list[int]:
    """The ingest workers (children of the first worker running gateway.worker_main)."""
    assert gw.proc is not None
    kids = Path(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children").read_text().split()
    out = []
    for pid in map(int, kids):
        try:
            if b"gateway.worker_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            pass
    return sorted(out)


async def scrape(url: str) -> dict[str, float]:
    """/metrics on a new connection (any worker may answer), as name{labels} -> value."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.get(url + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


async def started(gateway_process: Any, out: Path, n: int = WORKERS) -> GatewayProcess:
    gw = await gateway_process(args=("--workers", str(n)), **archive_config(out))

    async def all_up() -> bool:
        return len(worker_pids(gw)) == n - 1 and (await scrape(gw.url)).get("gateway_server_workers") == n

    await wait_until(all_up, what=f"{n} workers", timeout=20, poll=0.1, seen=lambda: gw.log_tail())
    return gw


async def test_workers_share_the_port_the_spool_and_the_counters(gateway_process: Any, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    gw = await started(gateway_process, out)
    # A connection a request: the kernel spreads them over the workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for i in range(90):
            async with s.post(gw.url + "/v1/track", headers=AUTH_HEADERS,
                              json={"userId": "u", "event": "E", "messageId": f"c-900-{i}"}) as r:
                assert r.status == 200, await r.text()
        # The same messageId through every worker: stored once (one writer, one index).
        for _ in range(30):
            async with s.post(gw.url + "/v1/track", headers=AUTH_HEADERS,
                              json={"userId": "u", "event": "Again", "messageId": "c-901-0"}) as r:
                assert r.status == 200
    ids = await wait_delivered(out, {f"c-900-{i}" for i in range(90)} | {"c-901-0"})
    assert len(ids) == len(set(ids)) == 91, "each call delivered once, by the one delivery"

    async def counted() -> dict[str, float] | None:  # the file is written before the delivery is counted
        m = await scrape(gw.url)
        return m if m.get('gateway_destination_delivered_total{destination="Archive"}') == 91 else None
    m = await wait_until(counted, what="91 deliveries counted", timeout=10, poll=0.1)
    assert m['gateway_calls_accepted_total{source="web"}'] == 91
    assert m['gateway_calls_deduplicated_total{source="web"}'] == 29
    assert m['gateway_http_requests_total{endpoint="/v1/track",status="200"}'] == 120
    per_worker = {k: v for k, v in m.items() if k.startswith("gateway_server_worker_requests_total")}
    assert len(per_worker) == WORKERS and sum(per_worker.values()) >= 120, per_worker
    assert sum(1 for v in per_worker.values() if v > 0) >= 2, f"the kernel used one worker only: {per_worker}"
    assert m["gateway_spool_calls"] >= 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(6):  # whichever worker answers, it answers for all
            async with s.get(gw.url + "/ready") as r:
                assert r.status == 200 and (await r.json())["status"] == "ready"
    assert gw.terminate() == 0


async def test_sigkill_of_a_worker_under_load_loses_no_acknowledged_call(gateway_process: Any,
                                                                         tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    gw = await started(gateway_process, out)
    victim = worker_pids(gw)[0]
    load = Load(gw.url)
    await load.run(until_acked=600, then=lambda: os.kill(victim, signal.SIGKILL))
    await wait_gone(victim)
    # Requests the dead worker had were cut (not answered): never a 200 for a call not stored.
    assert load.acked and set(load.statuses) <= {200}, load.statuses
    await wait_delivered(out, load.acked)

    async def replaced() -> bool:
        pids = worker_pids(gw)
        m = await scrape(gw.url)
        return len(pids) == WORKERS - 1 and victim not in pids and m.get("gateway_server_workers") == WORKERS
    await wait_until(replaced, what="the killed worker to be started again", timeout=20, poll=0.1)
    assert (await scrape(gw.url))["gateway_server_worker_restarts_total"] == 1
    assert gw.terminate() == 0
    assert "worker 1 exited" in gw.log.read_text() or "worker 2 exited" in gw.log.read_text()


async def test_sigterm_drains_every_worker_and_exits_0(gateway_process: Any, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    gw = await started(gateway_process, out)
    pids = worker_pids(gw)
    load = Load(gw.url)
    code = await load.run(until_acked=600, then=gw.terminate)
    assert code == 0, gw.log_tail()
    for pid in pids:
        await wait_gone(pid)
    assert load.acked and set(load.statuses) <= {200}, load.statuses
    # In-flight requests were answered, not dropped (20 ms of margin, as in test_crash.py).
    dropped = [t for t, answered in load.requests if t < load.signalled - 0.02 and not answered]
    assert dropped == [], f"{len(dropped)} requests in flight at SIGTERM were dropped"
    log = gw.log.read_text()
    assert "gateway: stopped" in log and "Traceback" not in log, log[-3000:]
    await gateway_process(**archive_config(out))  # delivered by then, or after a restart
    await wait_delivered(out, load.acked)


async def test_ready_fails_while_a_worker_does_not_answer(gateway_process: Any, tmp_path: Path) -> None:
    gw = await started(gateway_process, tmp_path / "out.jsonl")
    frozen = worker_pids(gw)[0]
    os.kill(frozen, signal.SIGSTOP)
    try:
        async def says_so() -> str | None:
            # A connection the kernel gives the frozen worker is not answered: time out, try again.
            try:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                                 timeout=aiohttp.ClientTimeout(total=4)) as s:
                    async with s.get(gw.url + "/ready") as r:
                        body = await r.json()
                        return str(body["problems"]) if r.status == 503 else None
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return None
        problems = await wait_until(says_so, what="/ready to fail", timeout=30, poll=0.1)
        assert "does not answer" in problems, problems
    finally:
        os.kill(frozen, signal.SIGCONT)

    async def ready_again() -> bool:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            async with s.get(gw.url + "/ready") as r:
                return r.status == 200
    await wait_until(ready_again, what="/ready to answer 200 again", timeout=20, poll=0.2)


async def test_killing_the_first_worker_takes_the_others_with_it(gateway_process: Any, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    gw = await started(gateway_process, out)
    pids = worker_pids(gw)
    load = Load(gw.url)
    await load.run(until_acked=600, then=gw.kill)
    for pid in pids:  # no orphan keeps the port or sends to a writer that is gone
        await wait_gone(pid)
    assert load.acked and set(load.statuses) <= {200, 503}, load.statuses
    await gateway_process(**archive_config(out))
    await wait_delivered(out, load.acked)


async def test_on_nats_workers_are_more_publishers_and_delivery_runs_once(gateway_process: Any, tmp_path: Path,
                                                                        request: pytest.FixtureRequest) -> None:
    from nats_servers import delete_streams, nats_config, prefix

    node = request.getfixturevalue("nats_node")  # skips (or fails in CI) without nats-server
    stream = prefix()
    out = tmp_path / "out.jsonl"
    try:
        gw = await gateway_process(args=("--workers", str(WORKERS)), storage=nats_config(node.urls, stream),
                                   **archive_config(out))

        async def all_up() -> bool:
            return (await scrape(gw.url)).get("gateway_server_workers") == WORKERS
        await wait_until(all_up, what=f"{WORKERS} workers", timeout=30, poll=0.1, seen=lambda: gw.log_tail())
        load = Load(gw.url)
        await load.run(until_acked=600, then=lambda: None)
        assert load.acked and set(load.statuses) <= {200}, load.statuses
        ids = await wait_delivered(out, load.acked)
        assert len(ids) == len(set(ids)), "one delivery: each call once"
        m = await scrape(gw.url)
        assert m['gateway_calls_accepted_total{source="web"}'] == len(load.acked)
        assert gw.terminate() == 0
    finally:
        await delete_streams(node.urls, stream)


async def test_the_debugger_sees_the_calls_of_every_worker(gateway_process: Any, tmp_path: Path) -> None:
    from test_debugger import ADMIN, CREDS, Stream

    out = tmp_path / "out.jsonl"
    config = archive_config(out)
    config["server"] = {**config["server"], "admin": ADMIN}
    gw = await gateway_process(args=("--workers", str(WORKERS)), **config)
    async def all_up() -> bool:
        return (await scrape(gw.url)).get("gateway_server_workers") == WORKERS
    await wait_until(all_up, what=f"{WORKERS} workers", timeout=20, poll=0.1, seen=lambda: gw.log_tail())
    async with aiohttp.ClientSession() as watcher:
        resp = await watcher.get(gw.url + "/debugger/events", headers=CREDS)  # through whichever worker
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        stream = Stream(resp)
        try:
            # Each worker looks once a second whether the debugger is watched: probe
            # (a connection a call, so every worker gets some) until every probe shows.
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                rounds = itertools.count()

                async def relayed() -> bool:
                    ids = [f"probe-{next(rounds)}-{k}" for k in range(9)]
                    for mid in ids:
                        async with s.post(gw.url + "/v1/track", headers=AUTH_HEADERS,
                                          json={"userId": "probe", "event": "P", "messageId": mid}) as r:
                            assert r.status == 200
                    await asyncio.sleep(1.5)
                    return set(ids) <= {r["messageId"] for r in stream.of("accepted", userId="probe")}
                await wait_until(relayed, what="every worker to relay its records", timeout=30, poll=0)
                for i in range(30):
                    async with s.post(gw.url + "/v1/track", headers=AUTH_HEADERS,
                                      json={"userId": "dbg", "event": "Seen", "messageId": f"c-902-{i}"}) as r:
                        assert r.status == 200
            seen = await stream.wait("accepted", 30, userId="dbg")
            assert sorted(r["messageId"] for r in seen) == sorted(f"c-902-{i}" for i in range(30))
            await stream.wait("delivered", 1, destination="Archive")
        finally:
            await stream.close()
    m = await scrape(gw.url)
    assert sum(1 for k, v in m.items() if k.startswith("gateway_server_worker_requests_total") and v > 0) >= 2


async def test_workers_must_be_one_or_more(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(gateway_config(tmp_path))
    got = await gateway_cli("serve", "--config", str(tmp_path / "config.yaml"), "--workers", "0", cwd=tmp_path)
    assert got.returncode == 2 and "--workers must be 1 or more" in got.stderr, got


@pytest.fixture(autouse=True)
def _bounded_time() -> Any:
    t = time.monotonic()
    yield
    assert time.monotonic() - t < 90, "a worker test must stay well within its time budget"
