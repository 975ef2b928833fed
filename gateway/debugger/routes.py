"""The ``/debugger`` paths, each behind the admin's Basic auth.

Without ``server.admin`` nothing is added, so every ``/debugger`` path
answers aiohttp's own 404.  With it, every ``/debugger`` path (unknown ones
included) asks for the credentials first, so the 401 says nothing about what
exists.  What the page and the stream show comes from this process only:
the page says so (a gateway on a shared spool has one page per process).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from importlib import resources
from typing import Awaitable, Callable

import msgspec
from aiohttp import web

from gateway import app_state as state
from gateway.debugger.auth import REALM, AdminAuth
from gateway.debugger.status import RateHistory, destination_status, list_dead_letters, replay_dead_letters
from gateway.debugger.stream import Redactor, stream
from gateway.spool import StorageFailed

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: the page forbids itself anything but this origin (no CDN, no inline code)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY"}
#: bytes of a replay request's body at most
REPLAY_BODY = 4096
ASSETS = {"page.html": "text/html", "page.js": "text/javascript", "page.css": "text/css"}

_encode = msgspec.json.Encoder().encode


class ReplayRequest(msgspec.Struct, forbid_unknown_fields=True):
    """What the replay button sends: a destination and/or a messageId."""

    destination: str | None = None
    messageId: str | None = None


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_encode(payload), content_type="application/json", headers=HEADERS)


def _asset(name: str) -> bytes:
    return resources.files("gateway.debugger").joinpath(name).read_bytes()


class Debugger:
    """The handlers, with what they read bound once."""

    def __init__(self, app: web.Application) -> None:
        cfg = app[state.CONFIG]
        assert cfg.server.admin is not None
        self.cfg = cfg
        self.auth = AdminAuth(cfg.server.admin)
        self.feed = app[state.ACTIVITY]
        self.workers = app[state.DELIVERY].workers
        self.history = RateHistory(self.workers)
        secrets = [k for s in cfg.sources for k in s.write_keys] + [cfg.server.admin.password]
        secrets += [s.track_api.api_key for s in cfg.sources if s.track_api is not None]  # a write key too
        self.redact = Redactor(secrets)
        self.assets = {name: _asset(name) for name in ASSETS}
        self.process = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                        "backend": cfg.storage.backend}
        #: set when the server stops: the streams end rather than hold up the shutdown
        self.stopping = asyncio.Event()

    def guarded(self, methods: dict[str, Handler]) -> Handler:
        """Credentials first, then the method: a stranger learns nothing."""
        auth = self.auth

        async def handler(request: web.Request) -> web.StreamResponse:
            if not auth.allows(request.headers.get("Authorization")):
                return web.Response(status=401, text="401: the debugger needs the admin's credentials",
                                    headers={**HEADERS, "WWW-Authenticate": REALM})
            h = methods.get(request.method)
            if h is None:
                if not methods:
                    return web.Response(status=404, text="404: Not Found", headers=HEADERS)
                return web.Response(status=405, text="405: Method Not Allowed",
                                    headers={**HEADERS, "Allow": ", ".join(sorted(methods))})
            return await h(request)
        return handler

    # -- the page -----------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.assets["page.html"], content_type="text/html", charset="utf-8",
                            headers={**HEADERS, "Content-Security-Policy": CSP})

    def asset(self, name: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=self.assets[name], content_type=ASSETS[name], charset="utf-8", headers=HEADERS)
        return handler

    # -- what it reads ------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        return await stream(request, self.feed, self.redact, {"process": self.process}, self.stopping)

    async def stop_streams(self, app: web.Application) -> None:
        """``on_shutdown``: end every stream now (aiohttp waits for handlers next)."""
        self.stopping.set()
        for w in self.feed.watchers:
            w.ready.set()

    async def status(self, request: web.Request) -> web.Response:
        now = time.time()
        return self._redacted({
            "at": now,
            "process": self.process,
            "sources": [s.name for s in self.cfg.sources],
            "watchers": len(self.feed.watchers),
            "destinations": [destination_status(w, self.history, now) for w in self.workers],
        })

    async def dead_letters(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        try:
            listed = await loop.run_in_executor(None, list_dead_letters, self.cfg.storage)
        except StorageFailed as e:
            return _json({"error": f"the dead letters cannot be read now: {e}"}, 503)
        return self._redacted(listed)

    async def replay(self, request: web.Request) -> web.Response:
        """``gateway dlq replay`` for one destination and/or messageId.  Only
        from the page: a JSON body (which a form on another site cannot send
        without a preflight that nothing here answers)."""
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return _json({"error": "replay is for the debugger page only"}, 403)
        if request.content_type != "application/json":
            return _json({"error": "send application/json"}, 415)
        raw = await request.content.read(REPLAY_BODY + 1)
        if len(raw) > REPLAY_BODY:
            return _json({"error": "request too large"}, 413)
        try:
            want = msgspec.json.decode(raw, type=ReplayRequest)
        except msgspec.DecodeError as e:
            return _json({"error": f"invalid request: {e}"}, 400)
        if not (want.destination or want.messageId):
            return _json({"error": "name a destination, a messageId or both"}, 400)
        loop = asyncio.get_running_loop()
        try:
            letters = await loop.run_in_executor(None, replay_dead_letters, self.cfg.storage,
                                                 want.destination or None, want.messageId or None)
        except StorageFailed as e:
            return _json({"error": f"the dead letters cannot be replayed now: {e}"}, 503)
        names = {x.destination for x in letters}
        for w in self.workers:
            if w.name in names:
                w.wakeup.set()  # look at the retries now, not at the next poll
        if self.feed.watched:
            for x in letters:
                self.feed.call_record("replayed", x.data, destination=x.destination, source=x.source,
                                      reason=x.reason, status=x.status)
        return _json({"replayed": len(letters),
                      "letters": [{"id": x.id, "destination": x.destination, "messageId": x.message_id}
                                  for x in letters]}, 200 if letters else 404)

    def _redacted(self, payload: object) -> web.Response:
        return web.Response(body=self.redact(_encode(payload)), content_type="application/json", headers=HEADERS)


def setup_debugger_routes(app: web.Application) -> None:
    """Add ``/debugger`` when ``server.admin`` is set; nothing otherwise."""
    if app[state.CONFIG].server.admin is None:
        return
    d = Debugger(app)
    paths: dict[str, dict[str, Handler]] = {
        "/debugger": {"GET": d.page},
        "/debugger/page.js": {"GET": d.asset("page.js")},
        "/debugger/page.css": {"GET": d.asset("page.css")},
        "/debugger/events": {"GET": d.events},
        "/debugger/status": {"GET": d.status},
        "/debugger/dead-letters": {"GET": d.dead_letters},
        "/debugger/replay": {"POST": d.replay},
    }
    for path, methods in paths.items():
        app.router.add_route("*", path, d.guarded(methods))
    app.router.add_route("*", "/debugger/{tail:.*}", d.guarded({}))
    app.cleanup_ctx.append(d.history.running)
    app.on_shutdown.append(d.stop_streams)
