"""The NATS backend's benchmark (issue 11): a 3-node JetStream cluster on
this machine (replicas 3, nats-server's default sync), then, in the same
run:

1. the yardstick: a bare nats-py publisher (``nats_bare.py``, 256 in
   flight) of messages the size of the gateway's: one call, and a
   100-call batch;
2. 1 and then 2 ``gateway serve`` processes sharing the stream, each with a
   ``webhook`` destination to a local sink that only counts (one consumer,
   shared): accepted calls/s for single calls and 100-call batches (wrk,
   the connections split between the gateways), and the end-to-end rate
   delivered to the sink while the batches come in.

    python bench/nats_bench.py [--duration 10] [--connections 32] [--gateways 1,2] [--sync-always]
                               [--dedup-window 0]

Every run checks that each call answered 200 reached the sink.  Targets:
single calls at least 0.5 of the bare publisher's messages/s of one-call
messages; batches at least 50,000 calls/s accepted and delivered.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import AUTH, CALL, ROOT, WRITE_KEY, Proc, free_port, lua_script, metrics, scratch, wrk_each  # noqa: E402
from nats_servers import NatsCluster  # noqa: E402

TARGET_SINGLE_RATIO = 0.5
TARGET_BATCH = 50_000
BATCH = 100


def sink_count(port: int) -> int:
    return int(urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=10).read())


def call_sizes() -> tuple[int, int]:
    """Bytes of a message of one call and of a 100-call batch, as the
    gateway stores them (the calls enriched, joined by newlines)."""
    from gateway import config as config_mod
    from gateway.ingest import Ingest

    cfg = config_mod.loads(f'sources: [{{name: default, write_keys: ["{WRITE_KEY}"]}}]')
    ingest = Ingest(cfg, [])
    one = json.dumps({**CALL, "messageId": "t1234567890-1"}).encode()
    single = ingest.prepare("track", one, {"Authorization": AUTH}, "127.0.0.1").rows
    batch = json.dumps({"batch": [{**CALL, "messageId": f"t1234567890-1-{i}"} for i in range(BATCH)]}).encode()
    rows = ingest.prepare("batch", batch, {"Authorization": AUTH}, "127.0.0.1").rows
    return len(single[0]), len(b"\n".join(rows))


def bare(cluster: NatsCluster, size: int, duration: float, log: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "nats_bare.py"), "--servers", ",".join(cluster.urls),
                          "--size", str(size), "--duration", str(duration)],
                         capture_output=True, text=True, timeout=duration + 120)
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"nats_bare failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def gateway_config(tmp: Path, name: str, cluster: NatsCluster, stream: str, sink_port: int,
                   dedup_window: str | None = None) -> Path:
    cfg = tmp / f"{name}.yaml"
    dedup = f"\n  dedup_window: {dedup_window}" if dedup_window is not None else ""
    cfg.write_text(f"""
server: {{host: 127.0.0.1, max_event_bytes: 64KiB, max_batch_bytes: 1MiB}}
storage:
  backend: nats
  max_bytes: 4GiB{dedup}
  nats: {{servers: {json.dumps(cluster.urls)}, stream: {stream}, replicas: 3}}
sources:
  - name: default
    write_keys: ["{WRITE_KEY}"]
destinations:
  - name: Sink
    type: webhook
    settings: {{url: "http://127.0.0.1:{sink_port}/batch"}}
    retry: {{backoff_base: 0.2, backoff_cap: 2}}
""")
    return cfg


def wrk_all(ports: list[int], script: Path, duration: float, connections: int) -> dict[str, float]:
    """wrk against every gateway at once (the connections split), summed."""
    results = wrk_each(ports, script, duration, max(1, connections // len(ports)))
    total = {k: sum(r[k] for r in results) for k in ("rps", "requests", "non2xx", "socket_errors")}
    total["p99"] = max(r["p99"] for r in results)
    total["p50"] = max(r["p50"] for r in results)
    return total


def wait_delivered(sink_port: int, want: int, timeout: float) -> float:
    start = time.monotonic()
    while sink_count(sink_port) < want:
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"the sink has {sink_count(sink_port)} of {want} calls after {timeout}s")
        time.sleep(0.25)
    return time.monotonic() - start


def run_gateways(tmp: Path, cluster: NatsCluster, n: int, a: argparse.Namespace) -> dict[str, Any]:
    stream = f"BENCH{n}"
    sink_port = free_port()
    sink = Proc([sys.executable, str(ROOT / "bench" / "sink.py"), "--port", str(sink_port)], sink_port,
                tmp / f"sink-{n}.log")
    ports = [free_port() for _ in range(n)]
    gws = [Proc([sys.executable, "-m", "gateway", "serve", "--quiet", "--config",
                 str(gateway_config(tmp, f"gw{n}-{i}", cluster, stream, sink_port, a.dedup_window)), "--port", str(p)], p,
                tmp / f"gateway-{n}-{i}.log", cwd=tmp) for i, p in enumerate(ports)]
    single, batch = tmp / "single.lua", tmp / "batch.lua"
    lua_script(single, 1)
    lua_script(batch, BATCH)
    try:
        warm = wrk_all(ports, single, 2, a.connections)
        acked = int(warm["requests"] - warm["non2xx"])
        wait_delivered(sink_port, acked, 120)
        s = wrk_all(ports, single, a.duration, a.connections)
        acked += int(s["requests"] - s["non2xx"])
        wait_delivered(sink_port, acked, 120)
        before = sink_count(sink_port)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(1.0):
                samples.append((time.monotonic(), sink_count(sink_port)))
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        b = wrk_all(ports, batch, a.duration, a.connections)
        stop.set()
        t.join()
        acked += int(b["requests"] - b["non2xx"]) * BATCH
        drain = wait_delivered(sink_port, acked, 300)
        delivered = sink_count(sink_port)
        m = [metrics(p) for p in ports]
    finally:
        codes = [g.stop() for g in gws]
        sink.stop()
    steady = samples[2:-1] if len(samples) > 4 else samples
    rate = (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0]) if len(steady) > 1 else float("nan")
    return {"n": n, "single": s, "batch": b, "delivered_rate": rate, "acked": acked, "delivered": delivered,
            "drain": drain, "codes": codes, "batch_delivered": delivered - before,
            "publish_p99": [_p99(x, "gateway_nats_publish_seconds") for x in m]}


def _p99(m: dict[str, float], name: str) -> float:
    """The 99th percentile of a histogram of /metrics, in ms (its bucket bound)."""
    buckets = sorted((float(k.split('le="')[1].split('"')[0]), v) for k, v in m.items()
                     if k.startswith(f"{name}_bucket{{") and "+Inf" not in k)
    total = m.get(f"{name}_count", 0)
    for bound, count in buckets:
        if total and count >= 0.99 * total:
            return bound * 1000
    return float("inf")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--gateways", default="1,2", help="gateway processes per run, comma-separated")
    ap.add_argument("--sync-always", action="store_true", help="nats-server with sync_interval: always")
    ap.add_argument("--keep", action="store_true", help="keep the stores and logs (printed at the end)")
    ap.add_argument("--dedup-window", help="storage.dedup_window of the gateways (default: 24h; 0 turns "
                    "deduplication off, to see what it costs)")
    a = ap.parse_args()
    with scratch("gateway-bench-nats-", a.keep) as tmp:
        cluster = NatsCluster(tmp / "nats", 3, sync_always=a.sync_always)
        (tmp / "nats").mkdir()
        cluster.start()
        try:
            return measure(a, tmp, cluster)
        finally:
            cluster.stop()


def measure(a: argparse.Namespace, tmp: Path, cluster: NatsCluster) -> int:
    one, hundred = call_sizes()
    # The yardstick before and after the gateways (the machine is shared: its mean is the yardstick).
    before = bare(cluster, one, a.duration, tmp / "bare-1.log"), bare(cluster, hundred, a.duration, tmp / "bare-100.log")
    runs = [run_gateways(tmp, cluster, int(n), a) for n in a.gateways.split(",")]
    after = bare(cluster, one, a.duration, tmp / "bare-1b.log"), bare(cluster, hundred, a.duration, tmp / "bare-100b.log")
    y1, y100 = ({"rate": (x["rate"] + y["rate"]) / 2, "p99_ms": max(x["p99_ms"], y["p99_ms"]),
                 "rates": (x["rate"], y["rate"])} for x, y in zip(before, after))
    cores = os.cpu_count() or 1
    print(f"\n3-node JetStream cluster on 127.0.0.1 (nats-server {_version()}, replicas 3, "
          f"{'sync_interval: always' if a.sync_always else 'default sync'}), {cores} cores shared by the servers, "
          f"the gateways, wrk (-c{a.connections} in all, {a.duration:.0f} s) and the sink")
    print(f"bare nats-py publisher, 256 in flight (mean of a run before and one after the gateways): "
          f"{y1['rate']:,.0f} messages/s of {one} bytes ({y1['rates'][0]:,.0f} and {y1['rates'][1]:,.0f}; p99 "
          f"{y1['p99_ms']:.1f} ms); {y100['rate']:,.0f} messages/s of {hundred:,} bytes "
          f"({y100['rates'][0]:,.0f} and {y100['rates'][1]:,.0f}; {y100['rate'] * BATCH:,.0f} calls/s)")
    ok = True
    for r in runs:
        s, b = r["single"], r["batch"]
        ratio = s["rps"] / y1["rate"]
        calls = b["rps"] * BATCH
        verdicts = [ratio >= TARGET_SINGLE_RATIO, calls >= TARGET_BATCH, r["delivered_rate"] >= TARGET_BATCH]
        print(f"{r['n']} gateway(s): single calls {s['rps']:,.0f}/s accepted (x{ratio:.2f} the bare publisher: "
              f"{'met' if verdicts[0] else 'MISSED'} >= {TARGET_SINGLE_RATIO}; p50 {s['p50']:.1f} ms, p99 "
              f"{s['p99']:.1f} ms); 100-call batches {calls:,.0f} calls/s accepted "
              f"({'met' if verdicts[1] else 'MISSED'}), {r['delivered_rate']:,.0f} calls/s delivered end to end "
              f"({'met' if verdicts[2] else 'MISSED'}; p99 {b['p99']:.1f} ms); publish p99 "
              f"{', '.join(f'{x:.1f}' for x in r['publish_p99'])} ms")
        good = r["delivered"] >= r["acked"] and all(c == 0 for c in r["codes"])
        print(f"  check: {r['acked']:,} calls answered 200, {r['delivered']:,} delivered to the sink "
              f"({r['drain']:.1f}s to drain after the load), non-2xx {int(s['non2xx'] + b['non2xx'])}, exit codes "
              f"{r['codes']}: {'OK' if good else 'LOST CALLS'}")
        ok = ok and good
    return 0 if ok else 1


def _version() -> str:
    from nats_servers import NATS_SERVER
    try:
        return subprocess.run([NATS_SERVER or "nats-server", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip().split("v")[-1]
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
