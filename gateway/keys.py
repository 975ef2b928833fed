"""Typed app state: every key in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.delivery import Delivery
    from gateway.ingest import Ingest
    from gateway.metrics import Counters
    from gateway.plugins import Built
    from gateway.share import Turns
    from gateway.spool.sqlite import SqliteSpool
    from prometheus_client import CollectorRegistry

CONFIG: web.AppKey["Config"] = web.AppKey("config")
BUILT: web.AppKey["Built"] = web.AppKey("built")
INGEST: web.AppKey["Ingest"] = web.AppKey("ingest")
SPOOL: web.AppKey["SqliteSpool"] = web.AppKey("spool")
DELIVERY: web.AppKey["Delivery"] = web.AppKey("delivery")
COUNTERS: web.AppKey["Counters"] = web.AppKey("counters")
REGISTRY: web.AppKey["CollectorRegistry"] = web.AppKey("registry")
HTTP: web.AppKey[aiohttp.ClientSession] = web.AppKey("http")
TURNS: web.AppKey["Turns"] = web.AppKey("turns")
#: the source a request's write key belongs to, for its CORS headers
#: (web.RequestKey from aiohttp 3.14; a plain string before it)
SOURCE: Any = web.RequestKey("source", str) if hasattr(web, "RequestKey") else "source"
