"""Two versions of the gateway under the same load at the same time.

On a shared machine the bare handler's rate moves by half between runs,
so alternating runs cannot see a 5% change.  Here both gateways run at
once, each with its own spool and half of the connections, so whatever
else the machine does slows both alike; the ratio of what each served is
the comparison.  ``--base`` is another checkout (``git worktree add
/tmp/base <commit>``); give it as both to see the method's own spread
(an A/A run).

    python bench/side_by_side.py --base /tmp/base [--rounds 4] [--duration 10]
                                 [--connections 32] [--dedup-window 0] [--base-dedup-window 0]

Prints, each round and shape, the calls each answered 200 and the
ratio this checkout / base; then the mean ratio.  Every call answered
200 must be in the gateway's file destination, or the round fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Proc, free_port, gateway_config, lua_script, scratch, wait_drained, wrk_each  # noqa: E402

BATCH = 100


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="the other checkout's root")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=32, help="split between the two gateways")
    ap.add_argument("--dedup-window", help="storage.dedup_window of this checkout (default: the config's)")
    ap.add_argument("--base-dedup-window",
                    help="storage.dedup_window of the base (default: none set, for versions that lack the key)")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    with scratch("gateway-side-", a.keep) as tmp:
        return measure(a, tmp)


def start(tmp: Path, name: str, root: Path, dedup_window: str | None) -> tuple[Proc, Path]:
    d = tmp / name
    d.mkdir()
    archive = d / "events.jsonl"
    cfg = gateway_config(d, f"""  - name: Archive
    type: file
    settings: {{path: {archive}}}""", dedup_window)
    port = free_port()
    return Proc([sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(port)], port,
                d / "gateway.log", cwd=root), archive


def measure(a: argparse.Namespace, tmp: Path) -> int:
    scripts = {"single calls": (tmp / "single.lua", 1), f"{BATCH}-call batches": (tmp / "batch.lua", BATCH)}
    for path, n in scripts.values():
        lua_script(path, n)
    half = max(1, a.connections // 2)
    ratios: dict[str, list[float]] = {k: [] for k in scripts}
    failed = False
    for r in range(1, a.rounds + 1):
        for shape, (script, n) in scripts.items():
            rdir = tmp / f"round{r}-{n}"
            rdir.mkdir()
            this, this_file = start(rdir, "this", ROOT, a.dedup_window)
            try:
                base, base_file = start(rdir, "base", a.base.resolve(), a.base_dedup_window)
            except BaseException:
                this.stop()
                raise
            try:
                warm = wrk_each([this.port, base.port], script, 2, half)
                got = wrk_each([this.port, base.port], script, a.duration, half)
                for g in (this, base):
                    wait_drained(g.port, "Archive", 300)
            finally:
                codes = [this.stop(), base.stop()]
            acked, warm_acked = ([int((w["requests"] - w["non2xx"]) * n) for w in run] for run in (got, warm))
            delivered = [sum(1 for _ in open(f, "rb")) for f in (this_file, base_file)]
            ratio = acked[0] / acked[1] if acked[1] else float("nan")
            ratios[shape].append(ratio)
            lost = [d < x + w for d, x, w in zip(delivered, acked, warm_acked)]
            failed |= any(lost) or any(codes)
            print(f"round {r}, {shape}: this {acked[0] / a.duration:,.0f} calls/s, base {acked[1] / a.duration:,.0f};"
                  f" this/base {ratio:.3f}" + (f"  LOST CALLS {lost} exit codes {codes}" if any(lost) or any(codes)
                                               else ""), flush=True)
    print(f"\nboth at once on 127.0.0.1, wrk -t1 -c{half} -d{a.duration:g}s against each; this: {ROOT}, "
          f"base: {a.base.resolve()}")
    for shape, rs in ratios.items():
        spread = f" (from {min(rs):.3f} to {max(rs):.3f})" if len(rs) > 1 else ""
        print(f"{shape}: this/base {statistics.mean(rs):.3f} over {len(rs)} round(s){spread}")
    print(json.dumps({k: [round(x, 4) for x in v] for k, v in ratios.items()}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
