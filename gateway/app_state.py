"""Typed state of the aiohttp app: every key in one place.

Only ``CONFIG`` is part of the plugin API (``gateway.api.config_of``); the
others are the core's own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from gateway.activity import ActivityFeed
    from gateway.config import Config
    from gateway.delivery import Delivery
    from gateway.ingest import Ingest
    from gateway.intake import Intake
    from gateway.loop_share import IngestShare
    from gateway.metrics import Counters
    from gateway.plugins import Built
    from gateway.spool import Spool
    from gateway.workers import Runtime, WorkerPool

CONFIG: web.AppKey["Config"] = web.AppKey("config")
BUILT: web.AppKey["Built"] = web.AppKey("built")
INGEST: web.AppKey["Ingest"] = web.AppKey("ingest")
SPOOL: web.AppKey["Spool"] = web.AppKey("spool")
DELIVERY: web.AppKey["Delivery"] = web.AppKey("delivery")
COUNTERS: web.AppKey["Counters"] = web.AppKey("counters")
METRICS: web.AppKey["CollectorRegistry"] = web.AppKey("metrics")
INGEST_SHARE: web.AppKey["IngestShare"] = web.AppKey("ingest_share")
ACTIVITY: web.AppKey["ActivityFeed"] = web.AppKey("activity")
INTAKE: web.AppKey["Intake"] = web.AppKey("intake")
#: gateway serve --workers N: the first worker's pool of the others (None otherwise)
WORKERS: web.AppKey["WorkerPool | None"] = web.AppKey("workers")
#: gateway serve --workers N: set in the other workers, which only store calls
INGEST_WORKER: web.AppKey["Runtime | None"] = web.AppKey("ingest_worker")
#: the source a request's write key belongs to, for its CORS headers
#: (web.RequestKey from aiohttp 3.14; a plain string before it)
SOURCE: Any = web.RequestKey("source", str) if hasattr(web, "RequestKey") else "source"
