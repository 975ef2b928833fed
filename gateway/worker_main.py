"""An ingest worker of ``gateway serve --workers N`` (gateway/workers.py):
the process the first worker starts N-1 times.

    python -m gateway.worker_main --config C --host H --port P --runtime DIR --index I --parent PID
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.workers import Runtime, control_app, relay_activity

if TYPE_CHECKING:
    from gateway.config import Config


def die_with_parent(parent: int) -> None:
    """SIGTERM when process ``parent`` dies (Linux), so no worker outlives it
    (also the benchmark's bare handler, bench/bare.py)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


async def _run_worker(cfg: "Config", args: argparse.Namespace) -> None:
    from gateway import app_state as state
    from gateway.app import create_app
    from gateway.cli import server_runner
    from gateway.tls import server_ssl_context

    runtime = Runtime(Path(args.runtime))
    app = create_app(cfg, ingest_worker=runtime)
    control = web.AppRunner(control_app(app[state.COUNTERS], app[state.SPOOL], int(cfg.server.max_event_bytes)),
                            access_log=None)
    await control.setup()
    relay = asyncio.create_task(relay_activity(app[state.ACTIVITY], runtime), name="activity-relay")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = server_runner(app, cfg)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port, backlog=2048, reuse_address=True, reuse_port=True,
                          ssl_context=server_ssl_context(cfg)).start()
        # Once it listens: the first worker counts it as running when it answers here.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(runtime.worker(args.index))
        await web.UnixSite(control, runtime.worker(args.index)).start()
        await stop.wait()
    finally:
        relay.cancel()
        await runner.cleanup()
        await control.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway.worker_main", description="one ingest worker (see the module)")
    p.add_argument("--config", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--runtime", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    args = p.parse_args(argv)
    die_with_parent(args.parent)
    logging.basicConfig(level=os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {args.index}]: %(message)s")
    from gateway import config
    from gateway.cli import event_loop_runner
    from gateway.spool import StorageFailed

    cfg = config.load(args.config)
    with event_loop_runner() as runner:
        try:
            runner.run(_run_worker(cfg, args))
        except (OSError, StorageFailed) as e:
            print(f"gateway worker {args.index}: cannot start: {e}", file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
