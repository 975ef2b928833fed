"""Delivery benchmarks (issue 3).

    python bench/delivery.py [--duration 10] [--backlog 1000000]

1. End to end: 100-call batches posted with wrk (32 connections) → gateway
   (SQLite spool) → ``webhook`` destination → a local sink that only counts.
   Prints calls/s delivered to the sink in the steady state, and ingest.
2. Backlog: the sink is down (connection refused) while ``--backlog`` calls
   are ingested; the gateway's RSS is sampled throughout and must stay under
   300 MB; then the sink comes up and the time to deliver every call is
   measured.  The bench config caps the retry backoff at 2 s
   (``retry.backoff_cap``) so that delivery resumes within 2 s of the sink's
   return; the default cap is 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (AUTH, CALL, ROOT, Proc, free_port, gateway_config, lua_script, metrics, run_wrk,  # noqa: E402
                    scratch)

TARGET_E2E = 50_000
TARGET_RSS_MB = 300
BATCH = 100


def sink_count(port: int) -> int:
    return int(urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=10).read())


def start_sink(port: int, log: Path) -> Proc:
    return Proc([sys.executable, str(ROOT / "bench" / "sink.py"), "--port", str(port)], port, log)


#: storage.dedup_window of the runs (None: the config's default, 24h); --dedup-window sets it
DEDUP_WINDOW: str | None = None


def webhook_config(tmp: Path, sink_port: int) -> Path:
    return gateway_config(tmp, f"""  - name: Sink
    type: webhook
    settings: {{url: "http://127.0.0.1:{sink_port}/batch"}}
    retry: {{backoff_base: 0.2, backoff_cap: 2}}""", DEDUP_WINDOW)


def end_to_end(tmp: Path, duration: float, connections: int) -> None:
    sink_port, port = free_port(), free_port()
    sink = start_sink(sink_port, tmp / "sink.log")
    gw = Proc([sys.executable, "-m", "gateway", "serve", "--config", str(webhook_config(tmp / "e2e", sink_port)),
               "--port", str(port)], port, tmp / "gateway-e2e.log", cwd=tmp)
    script = tmp / "batch.lua"
    lua_script(script, BATCH)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append((time.monotonic(), sink_count(sink_port)))

    t = threading.Thread(target=sample, daemon=True)
    try:
        t.start()
        res = run_wrk(f"http://127.0.0.1:{port}", script, duration, connections, 1)
        stop.set()
        t.join()
        acked = int(res["requests"] - res["non2xx"]) * BATCH
        deadline = time.monotonic() + 120
        while sink_count(sink_port) < acked and time.monotonic() < deadline:
            time.sleep(0.5)
        delivered = sink_count(sink_port)
    finally:
        gw.stop()
        sink.stop()
    steady = samples[2:-1] if len(samples) > 4 else samples  # skip the ramp-up and the tail
    rate = (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0]) if len(steady) > 1 else float("nan")
    print(f"end to end (wrk -c{connections} -d{duration:.0f}s, {BATCH}-call batches → spool → webhook → sink):")
    print(f"  ingest: {res['rps'] * BATCH:,.0f} calls/s ({res['rps']:,.0f} requests/s, p99 {res['p99']:.1f} ms)")
    print(f"  delivered to the sink in the steady state: {rate:,.0f} calls/s "
          f"(target >= {TARGET_E2E:,}: {'met' if rate >= TARGET_E2E else 'MISSED'})")
    print(f"  check: {acked:,} calls answered 200, {delivered:,} delivered: "
          f"{'OK' if delivered >= acked else 'LOST CALLS'}")


async def ingest(port: int, total: int, concurrency: int = 16) -> float:
    """Post ``total`` calls in 100-call batches; returns seconds taken."""
    import aiohttp

    head, tail = json.dumps(CALL, separators=(",", ":")).split('"MSGID"')
    sent = 0

    def body(i: int) -> bytes:
        calls = ",".join(f'{head}"b{i}-{j}"{tail}' for j in range(BATCH))
        return f'{{"batch":[{calls}]}}'.encode()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < total:
            i = sent
            sent += BATCH
            for _ in range(100):
                async with session.post(f"http://127.0.0.1:{port}/v1/batch", data=body(i),
                                        headers={"Authorization": AUTH,
                                                 "Content-Type": "application/json"}) as r:
                    await r.read()
                    if r.status == 200:
                        break
                    await asyncio.sleep(0.5)  # 503: the spool is full; retry as SDKs do
            else:
                raise RuntimeError("the gateway kept refusing a batch")

    start = time.monotonic()
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    return time.monotonic() - start


def backlog(tmp: Path, total: int) -> None:
    sink_port, port = free_port(), free_port()
    gw = Proc([sys.executable, "-m", "gateway", "serve", "--config", str(webhook_config(tmp / "backlog", sink_port)),
               "--port", str(port)], port, tmp / "gateway-backlog.log", cwd=tmp)
    rss: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            rss.append(gw.rss_mb())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        took = asyncio.run(ingest(port, total))
        rss_down = max(rss) if rss else gw.rss_mb()
        m = metrics(port)
        print(f"backlog: {total:,} calls ingested in {took:.1f}s ({total / took:,.0f} calls/s) while the sink "
              f"was down; gateway RSS peak {rss_down:.0f} MB (server and spool writer) (target < {TARGET_RSS_MB} MB: "
              f"{'met' if rss_down < TARGET_RSS_MB else 'MISSED'}); spool holds "
              f"{m.get('gateway_spool_calls', 0):,.0f} calls, {m.get('gateway_spool_bytes', 0) / 1e6:,.0f} MB")
        sink = start_sink(sink_port, tmp / "sink-backlog.log")
        start = time.monotonic()
        try:
            deadline = start + 1800
            while sink_count(sink_port) < total and time.monotonic() < deadline:
                time.sleep(0.5)
            drained = time.monotonic() - start
            got = sink_count(sink_port)
        finally:
            sink.stop()
        peak = max(rss) if rss else float("nan")
        print(f"  sink back: {got:,} of {total:,} calls delivered in {drained:.1f}s "
              f"({got / drained:,.0f} calls/s); RSS peak over the whole run {peak:.0f} MB: "
              f"{'OK' if got >= total and peak < TARGET_RSS_MB else 'FAILED'}")
    finally:
        stop.set()
        t.join()
        gw.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--backlog", type=int, default=1_000_000)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the spools and logs (printed at the end)")
    ap.add_argument("--dedup-window", help="storage.dedup_window (default: the config's, 24h; 0 turns it off)")
    a = ap.parse_args()
    global DEDUP_WINDOW
    DEDUP_WINDOW = a.dedup_window
    with scratch("gateway-bench-delivery-", a.keep) as tmp:
        for d in ("e2e", "backlog"):
            (tmp / d).mkdir()
        if not a.skip_e2e:
            end_to_end(tmp, a.duration, a.connections)
        if a.backlog:
            backlog(tmp, a.backlog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
