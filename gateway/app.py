"""The aiohttp application: routes, middlewares and the life of the spool and
delivery workers (``cleanup_ctx``)."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, Mapping

import msgspec
from aiohttp import web

from gateway import app_state as state
from gateway.activity import ActivityFeed
from gateway.browser import CUSTOMERIO, SEGMENT, Cors, public_base, settings_document
from gateway.config import Config, strict_for
from gateway.debugger import setup_debugger_routes
from gateway.delivery import Delivery
from gateway.errors import RETRY_AFTER, error_body, rejection_body
from gateway.events import BATCH_PATHS, PATH_TYPES
from gateway.http_body import read_body
from gateway.http_fast_path import ENDPOINTS, Answer
from gateway.ingest import Ingest
from gateway.ingest.auth import ProxyTrust
from gateway.ingest.call_checks import RequestRejected
from gateway.intake import Intake
from gateway.loop_share import IngestShare
from gateway.metrics import Counters, registry_for, render
from gateway.pixels import Pixels
from gateway.plugins import build
from gateway.spool import SpoolFull, StorageFailed, spool_for, spool_problems

if TYPE_CHECKING:
    from gateway.workers import Runtime, WorkerPool

log = logging.getLogger("gateway")

KINDS = frozenset(PATH_TYPES) | BATCH_PATHS
OK = b"{}"
_encode = msgspec.json.Encoder().encode


def _json(status: int, payload: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=_encode(payload), content_type="application/json", headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def strict_header(headers: Mapping[str, str]) -> bool:
    # docs/pipelines-api.md, "Strict and lax": "1" is strict, any other value lax
    return headers.get("X-Strict-Mode", "").strip() == "1"


class Handlers:
    """Request handlers, with what they use bound once.

    There are no middlewares: the ingest handler is the hot path, so it
    counts and answers CORS itself, and the others are wrapped by
    ``observed``; aiohttp then pays nothing per request for them."""

    def __init__(self, app: web.Application) -> None:
        self.cfg = app[state.CONFIG]
        self.ingest = app[state.INGEST]
        self.spool = app[state.SPOOL]
        self.counters = app[state.COUNTERS]
        self.metrics_registry = app[state.METRICS]
        self.cors = Cors(self.cfg)
        self.proxies = ProxyTrust(self.cfg.server.trusted_proxies)
        self.intake = app[state.INTAKE]
        self.feed = app[state.ACTIVITY]
        self.pool = app[state.WORKERS]
        self.delivery = app[state.DELIVERY]
        self.kinds = KINDS

    def body_limit(self, kind: str) -> int:
        return self.ingest.body_limit(kind)

    def observed(self, endpoint: str, handler: Handler) -> Handler:
        """Count the answer by endpoint and status; add CORS headers."""
        counters, cors = self.counters, self.cors

        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                resp = await handler(request)
            except web.HTTPException as e:
                resp = e
            except Exception:
                log.exception("error on %s %s", request.method, request.path)
                resp = _json(500, error_body("internal", "internal error"))
            origin = request.headers.get("Origin")
            if origin:
                resp.headers.update(cors.headers(origin, request.get(state.SOURCE)))
            counters.request(endpoint, resp.status)
            return resp
        return wrapped

    def calls_for(self, kind: str) -> Handler:
        return functools.partial(self.calls, kind=kind, endpoint=f"/v1/{kind}")

    async def calls(self, request: web.Request, *, kind: str, endpoint: str) -> web.StreamResponse:
        """The ingest endpoints through aiohttp (gateway/http_fast_path.py
        answers most requests without it, through ``answer_calls``)."""
        headers = request.headers
        unread = False
        try:
            body = await read_body(request, self.body_limit(kind))
        except RequestRejected as e:
            unread = not request.content.is_eof()  # close rather than drain what is left
            answer = self._refused(e, headers, request.remote, endpoint)
            self.counters.request(endpoint, answer.status)
        except Exception:
            answer = self._internal(endpoint)
            self.counters.request(endpoint, answer.status)
        else:
            answer = await self.answer_calls(kind, endpoint, body, headers, request.remote)
        resp = web.Response(status=answer.status, body=answer.body, content_type="application/json",
                            headers=answer.headers)
        if unread:
            resp.force_close()
        origin = headers.get("Origin")
        if origin:
            resp.headers.update(self.cors.headers(origin, answer.source))
        return resp

    async def answer_calls(self, kind: str, endpoint: str, body: bytes, headers: Mapping[str, str],
                           peer: str | None) -> Answer:
        """A whole ingest request whose body is read, answered and counted (by
        ``endpoint``, its path, and status): the one definition both HTTP paths use."""
        try:
            answer = await self._calls(kind, endpoint, body, headers, peer)
        except Exception:
            answer = self._internal(endpoint)
        self.counters.request(endpoint, answer.status)
        return answer

    @staticmethod
    def _internal(path: str) -> Answer:
        log.exception("error on POST %s", path)
        return Answer(500, _encode(error_body("internal", "internal error")))

    def _refused(self, e: RequestRejected, headers: Mapping[str, str], peer: str | None, path: str) -> Answer:
        """A request refused as a whole (auth, JSON, size, encoding)."""
        r = e.rejection
        self.counters.bump(self.counters.rejected, r.reason)
        # A source with strict: true is strict before its body is read; a
        # key that matches no source (a 401 too) takes server.strict.
        src = self.ingest.header_source(headers)
        strict = strict_header(headers) or strict_for(self.cfg, src)
        log.info("rejected %s request from %s: %s", path, peer, r.message)
        if self.feed.watched:
            self.feed.publish("rejected", source=src.name if src else None, reason=r.reason, field=r.field,
                              message=r.message, status=e.status, mode="strict" if strict else "lax")
        return Answer(e.status, _encode(rejection_body(r))) if strict else Answer(200, OK)

    async def _calls(self, kind: str, path: str, body: bytes, headers: Mapping[str, str],
                     peer: str | None) -> Answer:
        ingest = self.ingest
        try:
            prepared = await self.intake.prepare(ingest.prepare, kind, body, headers, peer)
        except RequestRejected as e:
            return self._refused(e, headers, peer, path)
        source = prepared.source
        strict = False
        if prepared.rejections or self.feed.watched:  # strict or lax matters only then
            strict = strict_header(headers) or strict_for(self.cfg, source)
        if prepared.rejections:
            log.info("rejected %d call(s) on %s from %s: %s", len(prepared.rejections), path,
                     peer, prepared.rejections[0].message)
        try:
            await self.intake.store(prepared, "strict" if strict else "lax")
        except (SpoolFull, StorageFailed) as e:
            log.warning("503 for %d call(s): %s", len(prepared.rows), e)
            return Answer(503, _encode(error_body("overload", f"the gateway cannot store calls right now: {e}")),
                          {"Retry-After": RETRY_AFTER}, source.name)
        if strict and prepared.rejections:
            if kind in BATCH_PATHS:
                n = len(prepared.rejections)
                first = prepared.rejections[0]
                return Answer(400, _encode(error_body(
                    first.reason,
                    f"{n} call(s) of the batch were rejected; the others were stored. {first.field}: {first.message}",
                    accepted=len(prepared.rows),
                    errors=[msgspec.to_builtins(r) for r in prepared.rejections])), None, source.name)
            return Answer(400, _encode(rejection_body(prepared.rejections[0])), None, source.name)
        return Answer(200, OK, None, source.name)

    async def sdk_metrics(self, request: web.Request) -> web.Response:
        try:
            await read_body(request, self.cfg.server.max_event_bytes)
        except RequestRejected:
            pass
        self.counters.sdk_metrics += 1
        return web.Response(body=OK, content_type="application/json")

    def settings_for(self, integration: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            key = request.match_info["write_key"]
            source = self.ingest.source_for_key(key)
            if source is None:
                return _json(404, error_body("auth", "unknown write key"))
            request[state.SOURCE] = source.name
            proto, host = public_base(request, self.cfg, self.proxies)
            return _json(200, settings_document(integration, key, proto, host))
        return handler

    async def preflight(self, request: web.Request) -> web.Response:
        return self.cors.preflight(request)

    async def health(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        problems = await spool_problems(self.spool, self.cfg.server.max_event_bytes, 2.0)
        if self.pool is not None:
            problems += await self.pool.problems()
        if problems:
            return _json(503, {"status": "not ready", "problems": problems})
        return _json(200, {"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        registry = self.metrics_registry
        pool = self.pool
        if pool is not None:  # every worker's ingest counters, added up
            from gateway.workers import summed

            total = summed(self.counters, await pool.counters())
            registry = registry_for(total, self.spool, self.delivery.workers, lambda: pool.restarts)
        return web.Response(body=render(registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def setup_routes(app: web.Application, handlers: Handlers) -> None:
    """Plain paths only: aiohttp finds them with one dict lookup."""
    r = app.router
    h = handlers
    for kind in sorted(KINDS):
        r.add_post(f"/v1/{kind}", h.calls_for(kind))
        r.add_route("OPTIONS", f"/v1/{kind}", h.observed("OPTIONS", h.preflight))
    r.add_post("/v1/m", h.observed("/v1/m", h.sdk_metrics))
    r.add_route("OPTIONS", "/v1/m", h.observed("OPTIONS", h.preflight))
    for prefix, integration in (("", SEGMENT), ("/customerio", CUSTOMERIO)):
        path = f"{prefix}/v1/projects/{{write_key}}/settings"
        r.add_get(path, h.observed(path, h.settings_for(integration)))
        r.add_route("OPTIONS", path, h.observed("OPTIONS", h.preflight))
    Pixels(app).add_routes(r, h.observed)
    r.add_get("/health", h.observed("/health", h.health))
    runtime = app[state.INGEST_WORKER]
    if runtime is not None:  # answered by the first worker, for every worker
        from gateway.workers import FIRST_WORKER_PATHS, PassToFirst

        forward = PassToFirst(runtime)
        app.on_cleanup.append(forward.close)
        for path in FIRST_WORKER_PATHS:
            r.add_route("*", path, forward)
            r.add_route("*", path + "/{tail:.*}", forward)
        return
    r.add_get("/ready", h.observed("/ready", h.ready))
    r.add_get("/metrics", h.observed("/metrics", h.metrics))
    setup_debugger_routes(app)


def create_app(cfg: Config, *, pool: "WorkerPool | None" = None,
               ingest_worker: "Runtime | None" = None) -> web.Application:
    """Build the app for a config: plugin objects, the spool (opened at
    start) and the delivery workers are built here, once, each with what it
    needs, so a config error fails before the server binds its port.

    ``gateway serve --workers N`` (gateway/workers.py): the first worker
    has the ``pool`` of the others; an ``ingest_worker`` stores calls and
    leaves delivery, /metrics, /ready and the debugger to the first."""
    built = build(cfg)
    counters = Counters()
    sqlite = cfg.storage.backend == "sqlite"
    if ingest_worker is not None:
        spool = spool_for(cfg.storage, counters.commit, (),
                          writer_address=ingest_worker.writer if sqlite else None)
    else:
        spool = spool_for(cfg.storage, counters.commit, cfg.destinations,
                          listener=pool.writer_listener() if pool is not None and sqlite else None)
    feed = ActivityFeed()
    delivery = Delivery(spool, built, cfg.storage.retention, feed)
    app = web.Application(client_max_size=cfg.server.max_batch_bytes + 1)
    app[state.CONFIG] = cfg
    app[state.BUILT] = built
    app[state.INGEST] = Ingest(cfg, built.source_transforms)
    app[state.COUNTERS] = counters
    app[state.SPOOL] = spool
    app[state.DELIVERY] = delivery
    app[state.ACTIVITY] = feed
    app[state.WORKERS] = pool
    app[state.INGEST_WORKER] = ingest_worker
    app[state.INGEST_SHARE] = share = IngestShare(contended=delivery.behind)
    app[state.INTAKE] = Intake(share, spool, counters, feed)
    app[state.METRICS] = registry_for(counters, spool, delivery.workers)
    app[ENDPOINTS] = handlers = Handlers(app)
    setup_routes(app, handlers)
    if any(s.kind == "track_api" for s in cfg.sources):
        from gateway.track_api.routes import setup_track_api_routes

        setup_track_api_routes(app, handlers.observed)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _call_hook(results: list[object]) -> None:
    for r in results:
        if asyncio.iscoroutine(r) or isinstance(r, asyncio.Future):
            await r


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    cfg, built, spool, delivery = app[state.CONFIG], app[state.BUILT], app[state.SPOOL], app[state.DELIVERY]
    await spool.open()
    if app[state.INGEST_WORKER] is not None:  # it only stores: the first worker delivers
        try:
            yield
        finally:
            await built.http.close()
            await spool.close()
        return
    try:
        await _call_hook(built.pm.hook.startup(app=app))
        delivery.start()
        try:
            yield
        finally:
            await delivery.stop(cfg.server.shutdown_timeout)
            await _call_hook(built.pm.hook.shutdown(app=app))
    finally:
        await built.http.close()
        await spool.close()
