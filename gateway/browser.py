"""What browser SDKs need beyond the API: their settings documents and CORS.

analytics.js (``@segment/analytics-next``) and Customer.io's browser SDK
fetch ``{cdnURL}/v1/projects/{writeKey}/settings`` before sending anything.
The document must name exactly one integration, the SDK's own: naming the
other makes each SDK try to load it as a device-mode plugin from a vendor
CDN, and then it never sends.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.config import Config
from gateway.ingest import ProxyTrust

SEGMENT = "Segment.io"
CUSTOMERIO = "Customer.io Data Pipelines"
ALLOW_HEADERS = "authorization, content-type, x-retry-count"
MAX_AGE = "86400"
PROTOCOLS = frozenset({"http", "https"})


def _split_public_url(url: str) -> tuple[str, str]:
    """``server.public_url`` → (protocol, host[:port][/path]); a URL without a
    scheme is taken as https."""
    proto, sep, rest = url.strip().partition("://")
    if not sep:
        proto, rest = "https", url.strip()
    proto = proto.lower()
    return (proto if proto in PROTOCOLS else "https"), rest.rstrip("/")


def _first(value: str | None) -> str:
    """The first (client-side) entry of a comma-separated X-Forwarded-* header."""
    return value.split(",")[0].strip() if value else ""


def public_base(request: web.Request, cfg: Config, trust: ProxyTrust) -> tuple[str, str]:
    """(protocol, host[:port]) SDKs should post to: ``server.public_url`` if
    set, else the request's scheme and Host, or X-Forwarded-Proto/-Host
    when the peer is a trusted proxy."""
    if cfg.server.public_url:
        return _split_public_url(cfg.server.public_url)
    proto, host = request.scheme, request.host
    if trust.trusts(request.remote):
        fwd_proto = _first(request.headers.get("X-Forwarded-Proto")).lower()
        if fwd_proto in PROTOCOLS:
            proto = fwd_proto
        host = _first(request.headers.get("X-Forwarded-Host")) or host
    return proto, host


def settings_document(integration: str, write_key: str, protocol: str, host: str) -> dict[str, Any]:
    return {
        "integrations": {
            integration: {
                "apiKey": write_key,
                "apiHost": f"{host}/v1",
                "protocol": protocol,
                "unbundledIntegrations": [],
                "addBundledMetadata": True,
                "maybeBundledConfigIds": {},
                "versionSettings": {"componentTypes": []},
            },
        },
        "plan": {"track": {"__default": {"enabled": True, "integrations": {}}},
                 "identify": {"__default": {"enabled": True}},
                 "group": {"__default": {"enabled": True}}},
        "edgeFunction": {},
        "analyticsNextEnabled": True,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        # sampleRate 0: analytics.js reports nothing to its vendor (its
        # default host is api.segment.io); host: if a page turns reports on
        # anyway, they come here (POST /v1/m), over https only.
        "metrics": {"sampleRate": 0, "host": f"{host}/v1"},
        "legacyVideoPluginsEnabled": False,
        "remotePlugins": [],
    }


class Cors:
    """Origins allowed per source, and the union for preflights (which carry
    no write key)."""

    def __init__(self, cfg: Config) -> None:
        default = cfg.server.cors_origins
        self.by_source = {s.name: frozenset(s.cors_origins if s.cors_origins is not None else default)
                          for s in cfg.sources}
        self.any = frozenset(default).union(*self.by_source.values()) if self.by_source else frozenset(default)

    @staticmethod
    def allowed(origins: frozenset[str], origin: str) -> bool:
        return "*" in origins or origin in origins

    def headers(self, origin: str | None, source: str | None) -> dict[str, str]:
        if not origin:
            return {}
        origins = self.by_source.get(source, self.any) if source else self.any
        if not self.allowed(origins, origin):
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}

    def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        headers = self.headers(origin, None)
        if not headers:
            return web.Response(status=403, text="origin not allowed")
        method = "GET" if request.path.endswith("/settings") else "POST"
        headers.update({
            "Access-Control-Allow-Methods": method,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": MAX_AGE,
        })
        # Chromium's Private Network Access: a site on a public address may
        # post to a gateway on a private one if the preflight says so.
        if request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
            headers["Access-Control-Allow-Private-Network"] = "true"
        return web.Response(status=204, headers=headers)
