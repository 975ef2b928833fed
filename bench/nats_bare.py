"""The yardstick of the NATS benchmark: a bare nats-py publisher, with
``--in-flight`` publishes awaiting the stream's acknowledgement at once,
to a stream made like the gateway's calls stream (file storage, the same
replicas, discard new), on the same event loop kind (uvloop if present).
Prints one JSON line: messages/s and the acknowledgement latency.

    python bench/nats_bare.py --servers nats://127.0.0.1:4222,... --size 700 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import nats
import nats.errors


async def main(a: argparse.Namespace) -> None:
    nc = await nats.connect(a.servers.split(","), max_reconnect_attempts=-1)
    stream, subject = f"{a.stream}_BARE", f"{a.stream}.bare"
    cfg = {"name": stream, "subjects": [subject], "retention": "limits", "storage": "file",
           "num_replicas": a.replicas, "discard": "new", "duplicate_window": 120_000_000_000}
    await nc.request(f"$JS.API.STREAM.DELETE.{stream}", b"", timeout=10)
    resp = json.loads((await nc.request(f"$JS.API.STREAM.CREATE.{stream}", json.dumps(cfg).encode(), timeout=10)).data)
    if "error" in resp:
        raise SystemExit(f"nats_bare: {resp['error']}")
    payload = os.urandom(a.size // 2).hex().encode()[:a.size]
    for _ in range(100):  # the new stream's leader may take a moment
        try:
            await nc.request(subject, b"warm-up", timeout=2)
            break
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            await asyncio.sleep(0.1)
    done = 0
    latencies: list[float] = []
    stop_at = time.monotonic() + a.duration
    ids = iter(range(1 << 62))

    async def publisher() -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            # Headers as the gateway sends them: a Nats-Msg-Id, the source, the receive time.
            msg = await nc.request(subject, payload, timeout=10, headers={
                "Nats-Msg-Id": f"bare-{next(ids)}", "Gw-Source": "default", "Gw-Received": f"{time.time():.6f}"})
            if b'"error"' in msg.data:
                raise SystemExit(f"nats_bare: {msg.data.decode()}")
            done += 1
            if done % 16 == 0:
                latencies.append(time.perf_counter() - started)

    started = time.monotonic()
    await asyncio.gather(*(publisher() for _ in range(a.in_flight)))
    took = time.monotonic() - started
    latencies.sort()
    await nc.request(f"$JS.API.STREAM.DELETE.{stream}", b"", timeout=10)
    await nc.close()
    print(json.dumps({"size": a.size, "messages": done, "seconds": took, "rate": done / took,
                      "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
                      "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None}), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", required=True)
    p.add_argument("--stream", default="BENCH")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--in-flight", type=int, default=256)
    args = p.parse_args()
    try:
        import uvloop
        uvloop.run(main(args))
    except ImportError:
        asyncio.run(main(args))
