"""Ingest benchmark (issues 2, 13 and 16): the gateway against a bare aiohttp
handler that only decodes the body with msgspec, same machine, same load,
same event loop (uvloop), one run.

    python bench/run.py [--duration 10] [--connections 32] [--threads 1] [--dedup-window 0]
                        [--shape server,browser] [--workers 1[,2]]

For each call shape (``--shape``: ``server``, a ~300-byte server-side track;
``browser``, a ~1 KB browser track; ``mobile``, the ~600-byte call of the
earlier figures), single calls and 100-call batches, each with a messageId
never sent before.  ``--workers 1,2`` measures each worker count against a
bare handler with as many processes (SO_REUSEPORT), and prints what the
second worker adds to batches.

Prints requests/s, events/s and latency for both, the ratios against the
targets, the gateway's CPU a call, and checks that every call the gateway
answered 200 was delivered (a benchmark that loses data does not count)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, SHAPES, Proc, free_port, gateway_config, lua_script, run_wrk,  # noqa: E402
                    scratch, wait_drained)

#: issue 16's targets, and issue 13's (with deduplication on, the default)
TARGETS = {"16": (0.8, 0.5), "13": (0.6, 0.3)}
TARGET_P99_MS = 10.0
TARGET_SECOND_WORKER = 1.3  # batch calls/s with 2 workers, against 1
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
    ap.add_argument("--workers", default="1", help="gateway serve --workers N, comma-separated (default: 1)")
    ap.add_argument("--shape", default="server,browser",
                    help=f"call shapes, comma-separated, of {', '.join(SHAPES)} (default: server,browser)")
    a = ap.parse_args()
    shapes = a.shape.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    workers = [int(w) for w in a.workers.split(",")]
    with scratch("gateway-bench-", a.keep) as tmp:
        results = {w: measure(a, tmp / f"workers-{w}", shapes, w) for w in workers}
    if 1 in results and len(results) > 1:
        for w, res in results.items():
            if w == 1:
                continue
            for shape in shapes:
                gain = res["batch"][shape] / results[1]["batch"][shape]
                print(f"{shape} calls, 100-call batches: {w} workers x{gain:.2f} the calls/s of 1 "
                      f"(target >= {TARGET_SECOND_WORKER}: {'met' if gain >= TARGET_SECOND_WORKER else 'MISSED'})")
    return 0 if all(r["ok"] for r in results.values()) else 1


def measure(a: argparse.Namespace, tmp: Path, shapes: list[str], workers: int) -> dict[str, Any]:
    """One worker count: the bare handler, then the gateway, every shape."""
    tmp.mkdir()
    scripts = {}
    for shape in shapes:
        scripts[shape] = (tmp / f"{shape}-single.lua", tmp / f"{shape}-batch.lua")
        lua_script(scripts[shape][0], 1, SHAPES[shape])
        lua_script(scripts[shape][1], BATCH, SHAPES[shape])
    load = dict(duration=a.duration, connections=a.connections, threads=a.threads)

    port = free_port()
    bare = Proc([sys.executable, str(ROOT / "bench" / "bare.py"), "--port", str(port), "--processes", str(workers)],
                port, tmp / "bare.log")
    url = f"http://127.0.0.1:{port}"
    b: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
    try:
        run_wrk(url, scripts[shapes[0]][0], 2, a.connections, a.threads)  # warm up
        for shape in shapes:
            b[shape] = (run_wrk(url, scripts[shape][0], **load), run_wrk(url, scripts[shape][1], **load))
    finally:
        bare.stop()

    archive = tmp / "events.jsonl"
    cfg = gateway_config(tmp, f"""  - name: Archive
    type: file
    settings: {{path: {archive}}}""", a.dedup_window)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    flag = ["--workers", str(workers)] if workers != 1 else []  # the flag is new: older versions compare too
    gw = Proc([sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(port), *flag], port,
              tmp / "gateway.log", cwd=tmp)
    g: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
    cpu: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
    drain = 0.0
    try:
        warm = run_wrk(url, scripts[shapes[0]][0], 2, a.connections, a.threads)
        wait_drained(port, "Archive", 120)
        for shape in shapes:
            # CPU a call, stored and delivered (the phase's load and its drain): steadier than rates here.
            c0 = gw.cpu_seconds()
            g1 = run_wrk(url, scripts[shape][0], **load)
            wait_drained(port, "Archive", 120)
            c1 = gw.cpu_seconds()
            g100 = run_wrk(url, scripts[shape][1], **load)
            drain = max(drain, wait_drained(port, "Archive", 300))
            c2 = gw.cpu_seconds()
            g[shape] = (g1, g100)
            cpu[shape] = ({k: (c1[k] - c0[k]) / g1["requests"] * 1e6 for k in c1},
                          {k: (c2[k] - c1[k]) / (g100["requests"] * BATCH) * 1e6 for k in c2})
        rss = gw.rss_mb()
    finally:
        code = gw.stop()

    acked = warm["requests"] - warm["non2xx"] + sum(
        s["requests"] - s["non2xx"] + (m["requests"] - m["non2xx"]) * BATCH for s, m in g.values())
    ids = set()
    delivered = 0
    with open(archive, "rb") as f:
        for line in f:
            delivered += 1
            ids.add(json.loads(line)["messageId"])
    cores = os.cpu_count() or 1
    dedup = "24h (default)" if a.dedup_window is None else a.dedup_window
    print(f"\nload: wrk -t{a.threads} -c{a.connections} -d{a.duration:g}s on 127.0.0.1, {cores} cores shared "
          f"by wrk and the server; gateway: default config (SQLite spool fsync'd, file destination), "
          f"dedup window {dedup}, a new messageId in every call, {workers} worker process(es); "
          f"bare handler: {workers} process(es)")
    print(f"{'':40} {'bare':>10} {'gateway':>10} {'ratio':>6}  targets (issue 16; issue 13)")
    verdicts = []
    batch_rate: dict[str, float] = {}  # calls/s of 100-call batches, by shape
    for shape in shapes:
        (b1, b100), (g1, g100) = b[shape], g[shape]
        size = len(json.dumps({**SHAPES[shape], "messageId": "t0123456789abcdef-1234"}, separators=(",", ":")))
        r1, r100 = g1["rps"] / b1["rps"], g100["rps"] / b100["rps"]
        rows = [
            (f"{shape} ({size} B), single: requests/s", b1["rps"], g1["rps"], r1,
             f">= {TARGETS['16'][0]}; >= {TARGETS['13'][0]}"),
            (f"{shape}, single: p50 / p99 ms", f"{b1['p50']:.1f} / {b1['p99']:.1f}",
             f"{g1['p50']:.1f} / {g1['p99']:.1f}", None, f"p99 < {TARGET_P99_MS:g} ms"),
            (f"{shape}, {BATCH}-call batches: events/s", b100["rps"] * BATCH, g100["rps"] * BATCH, r100,
             f">= {TARGETS['16'][1]}; >= {TARGETS['13'][1]}"),
            (f"{shape}, {BATCH}-call batches: p99 ms", b100["p99"], g100["p99"], None, ""),
        ]
        for name, bv, gv, ratio, target in rows:
            cells = [v if isinstance(v, str) else f"{v:,.1f}" for v in (bv, gv)]
            r = f"{ratio:6.2f}" if ratio is not None else " " * 6
            print(f"{name:40} {cells[0]:>10} {cells[1]:>10} {r}  {target}")
        c1, c100 = cpu[shape]
        print(f"{shape}: gateway CPU a call (stored and delivered), us: single: server {c1['server']:.1f}, "
              f"spool writer {c1['writer']:.1f}; batches: server {c100['server']:.1f}, "
              f"spool writer {c100['writer']:.1f}")
        for issue, (t1, t100) in TARGETS.items():
            verdicts += [(f"{shape} single ratio (issue {issue})", r1 >= t1),
                         (f"{shape} batch ratio (issue {issue})", r100 >= t100)]
        verdicts.append((f"{shape} single p99", g1["p99"] < TARGET_P99_MS))
        batch_rate[shape] = g100["rps"] * BATCH
    print("targets: " + ", ".join(f"{n} {'met' if ok else 'MISSED'}" for n, ok in verdicts))
    per_core = max(batch_rate.values()) / cores
    print(f"gateway events/s per core (batches): {per_core:,.0f}; RudderStack's gateway: about "
          f"{RUDDERSTACK_PER_CORE:,.0f} (3,000 events/s on 8 cores): x{per_core / RUDDERSTACK_PER_CORE:.0f}")
    print(f"non-2xx answers: {int(warm['non2xx'] + sum(s['non2xx'] + m['non2xx'] for s, m in g.values()))}, "
          f"socket errors: {int(sum(s['socket_errors'] + m['socket_errors'] for s, m in g.values()))}")
    ok = len(ids) >= acked and code == 0
    print(f"check: {int(acked):,} calls answered 200, {delivered:,} delivered to the file destination "
          f"({len(ids):,} distinct messageIds; {drain:.1f}s to drain after the load): "
          f"{'OK' if len(ids) >= acked else 'LOST CALLS'}; RSS {rss:.0f} MB; exit code {code}", flush=True)
    return {"ok": ok, "batch": batch_rate}


if __name__ == "__main__":
    sys.exit(main())
