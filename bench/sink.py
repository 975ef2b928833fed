"""A destination that only counts: every POST's calls (occurrences of
"messageId") are added up; GET /count returns the total."""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

count = 0


async def receive(request: web.Request) -> web.Response:
    global count
    count += (await request.read()).count(b'"messageId"')
    return web.Response(body=b"{}", content_type="application/json")


async def total(request: web.Request) -> web.Response:
    return web.Response(text=str(count))


async def main(port: int) -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", receive)
    app.router.add_get("/count", total)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    port = p.parse_args().port
    try:
        import uvloop
        uvloop.run(main(port))
    except ImportError:
        asyncio.run(main(port))
