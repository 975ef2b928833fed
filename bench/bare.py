"""The yardstick: a bare aiohttp handler that only reads the body and decodes
it with msgspec, on the same event loop as the gateway (uvloop if present)."""

from __future__ import annotations

import argparse
import asyncio

import msgspec
from aiohttp import web

_decode = msgspec.json.decode


async def handle(request: web.Request) -> web.Response:
    _decode(await request.read())
    return web.Response(body=b"{}", content_type="application/json")


async def main(port: int) -> None:
    app = web.Application(client_max_size=2 * 1024 * 1024)
    for path in ("/v1/track", "/v1/batch"):
        app.router.add_post(path, handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
    print(f"bare: listening on {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8201)
    port = p.parse_args().port
    try:
        import uvloop
        uvloop.run(main(port))
    except ImportError:
        asyncio.run(main(port))
