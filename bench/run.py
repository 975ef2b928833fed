"""Ingest benchmark (issue 2): the gateway against a bare aiohttp handler that
only decodes the body with msgspec, same machine, same load, one run.

    python bench/run.py [--duration 10] [--connections 32] [--threads 1] [--dedup-window 0] [--workers N]

Prints requests/s, events/s and latency for both, the ratios against the
targets, and checks that every call the gateway answered 200 was delivered
(a benchmark that loses data does not count)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Proc, free_port, gateway_config, lua_script, run_wrk, scratch, wait_drained  # noqa: E402

TARGET_SINGLE, TARGET_BATCH, TARGET_P99_MS = 0.6, 0.3, 10.0
RUDDERSTACK_PER_CORE = 3000 / 8
BATCH = 100


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the spool and logs (printed at the end)")
    ap.add_argument("--dedup-window", help="storage.dedup_window of the gateway (default: the config's, 24h; "
                    "0 turns deduplication off, to see what it costs)")
    ap.add_argument("--workers", type=int, default=1, help="gateway serve --workers N (default: 1)")
    a = ap.parse_args()
    with scratch("gateway-bench-", a.keep) as tmp:
        return measure(a, tmp)


def measure(a: argparse.Namespace, tmp: Path) -> int:
    single, batch = tmp / "single.lua", tmp / "batch.lua"
    lua_script(single, 1)
    lua_script(batch, BATCH)
    load = dict(duration=a.duration, connections=a.connections, threads=a.threads)

    port = free_port()
    bare = Proc([sys.executable, str(ROOT / "bench" / "bare.py"), "--port", str(port)], port, tmp / "bare.log")
    try:
        run_wrk(f"http://127.0.0.1:{port}", single, 2, a.connections, a.threads)  # warm up
        b1 = run_wrk(f"http://127.0.0.1:{port}", single, **load)
        b100 = run_wrk(f"http://127.0.0.1:{port}", batch, **load)
    finally:
        bare.stop()

    archive = tmp / "events.jsonl"
    cfg = gateway_config(tmp, f"""  - name: Archive
    type: file
    settings: {{path: {archive}}}""", a.dedup_window)
    port = free_port()
    workers = ["--workers", str(a.workers)] if a.workers != 1 else []  # the flag is new: older versions compare too
    gw = Proc([sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(port), *workers], port,
              tmp / "gateway.log", cwd=tmp)
    try:
        warm = run_wrk(f"http://127.0.0.1:{port}", single, 2, a.connections, a.threads)
        wait_drained(port, "Archive", 120)
        cpu = [gw.cpu_seconds()]
        g1 = run_wrk(f"http://127.0.0.1:{port}", single, **load)
        wait_drained(port, "Archive", 120)
        cpu.append(gw.cpu_seconds())
        g100 = run_wrk(f"http://127.0.0.1:{port}", batch, **load)
        drain = wait_drained(port, "Archive", 300)
        cpu.append(gw.cpu_seconds())
        rss = gw.rss_mb()
    finally:
        code = gw.stop()

    acked = sum(r["requests"] - r["non2xx"] for r in (warm, g1)) + (g100["requests"] - g100["non2xx"]) * BATCH
    ids = set()
    delivered = 0
    with open(archive, "rb") as f:
        for line in f:
            delivered += 1
            ids.add(json.loads(line)["messageId"])
    cores = os.cpu_count() or 1
    rows = [
        ("single track calls: requests/s", b1["rps"], g1["rps"], g1["rps"] / b1["rps"], f">= {TARGET_SINGLE}"),
        ("single track calls: p50 ms", b1["p50"], g1["p50"], None, ""),
        ("single track calls: p99 ms", b1["p99"], g1["p99"], None, f"< {TARGET_P99_MS} ms"),
        (f"{BATCH}-call batches: requests/s", b100["rps"], g100["rps"], None, ""),
        (f"{BATCH}-call batches: events/s", b100["rps"] * BATCH, g100["rps"] * BATCH,
         g100["rps"] / b100["rps"], f">= {TARGET_BATCH}"),
        (f"{BATCH}-call batches: p99 ms", b100["p99"], g100["p99"], None, ""),
    ]
    dedup = "24h (default)" if a.dedup_window is None else a.dedup_window
    print(f"\nload: wrk -t{a.threads} -c{a.connections} -d{a.duration}s on 127.0.0.1, {cores} cores shared "
          f"by wrk and the server; gateway: default config (SQLite spool fsync'd, file destination), "
          f"dedup window {dedup}, a new messageId in every call, {a.workers} worker process(es)")
    print(f"{'':34} {'bare':>12} {'gateway':>12} {'ratio':>7}  target")
    for name, b, g, ratio, target in rows:
        r = f"{ratio:7.2f}" if ratio is not None else " " * 7
        print(f"{name:34} {b:12.1f} {g:12.1f} {r}  {target}")
    verdicts = [
        ("single ratio", g1["rps"] / b1["rps"] >= TARGET_SINGLE),
        ("batch ratio", g100["rps"] / b100["rps"] >= TARGET_BATCH),
        ("single p99", g1["p99"] < TARGET_P99_MS),
    ]
    print("targets: " + ", ".join(f"{n} {'met' if ok else 'MISSED'}" for n, ok in verdicts))
    per_core = g100["rps"] * BATCH / cores
    print(f"gateway events/s per core (batches): {per_core:,.0f}; RudderStack's gateway: about "
          f"{RUDDERSTACK_PER_CORE:,.0f} (3,000 events/s on 8 cores): x{per_core / RUDDERSTACK_PER_CORE:.0f}")
    print(f"non-2xx answers: {int(g1['non2xx'] + g100['non2xx'] + warm['non2xx'])}, socket errors: "
          f"{int(g1['socket_errors'] + g100['socket_errors'])}")
    # CPU a call, stored and delivered (the phase's load and its drain): steadier than rates here.
    phases = ((cpu[0], cpu[1], g1["requests"]), (cpu[1], cpu[2], g100["requests"] * BATCH))
    per_call = [{k: (after[k] - before[k]) / calls * 1e6 for k in after} for before, after, calls in phases]
    print("gateway CPU a call (stored and delivered), us: " + "; ".join(
        f"{name}: server {c['server']:.1f}, spool writer {c['writer']:.1f}"
        for name, c in zip(("single", "batches"), per_call)))
    ok = len(ids) >= acked
    print(f"check: {int(acked):,} calls answered 200, {delivered:,} delivered to the file destination "
          f"({len(ids):,} distinct messageIds; {drain:.1f}s to drain after the load): "
          f"{'OK' if ok else 'LOST CALLS'}; RSS {rss:.0f} MB; exit code {code}")
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
