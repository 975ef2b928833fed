"""The yardstick: a bare aiohttp handler that only reads the body and decodes
it with msgspec, on the same event loop as the gateway (uvloop if present).

``--processes N`` serves the port from N processes (SO_REUSEPORT), the
yardstick for ``gateway serve --workers N``; SIGTERM to the first stops all."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import msgspec
from aiohttp import web

_decode = msgspec.json.decode


async def handle(request: web.Request) -> web.Response:
    _decode(await request.read())
    return web.Response(body=b"{}", content_type="application/json")


async def main(port: int, reuse_port: bool) -> None:
    app = web.Application(client_max_size=2 * 1024 * 1024)
    for path in ("/v1/track", "/v1/batch"):
        app.router.add_post(path, handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=2048, reuse_port=reuse_port or None).start()
    print(f"bare: listening on {port} (pid {os.getpid()})", flush=True)
    await asyncio.Event().wait()


def serve(port: int, reuse_port: bool) -> None:
    try:
        import uvloop
        uvloop.run(main(port, reuse_port))
    except ImportError:
        asyncio.run(main(port, reuse_port))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8201)
    p.add_argument("--processes", type=int, default=1)
    a = p.parse_args()
    children = []
    first = os.getpid()
    for _ in range(a.processes - 1):
        pid = os.fork()
        if pid == 0:
            from gateway.worker_main import die_with_parent

            die_with_parent(first)  # a first process killed (SIGKILL) takes the others with it
            serve(a.port, True)
            sys.exit(0)
        children.append(pid)

    def stop(signum: int, frame: object) -> None:
        for c in children:
            os.kill(c, signal.SIGTERM)
        for c in children:
            os.waitpid(c, 0)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    serve(a.port, a.processes > 1)
