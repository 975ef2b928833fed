"""The Track API's endpoints on the gateway's app (docs/track-api-coming-in.md).

Every request: Basic ``SITE_ID:API_KEY`` against every ``kind: track_api``
source (constant time), the body read within Track's limits, the mapping to
Pipelines calls, then the same per-call path as the Pipelines endpoints
(``Ingest.prepare_calls``: check, enrich, source transforms) and
``spool.append``.  A 200 means stored.  Errors are Track-shaped (v1:
``meta.errors``; v2: ``errors[]``, per item with ``batch_index`` in a 207)
and always carry ``code`` and ``message``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Iterable

import msgspec
from aiohttp import web

from gateway import app_state as state
from gateway.config import SourceConfig
from gateway.errors import RETRY_AFTER
from gateway.http_body import read_body
from gateway.ingest import BAD_JSON, BOM, Prepared
from gateway.ingest.call_checks import RequestRejected
from gateway.spool import SpoolFull, StorageFailed
from gateway.track_api import mapping
from gateway.track_api.validation import MAX_BATCH_BYTES, MAX_REQUEST_BYTES, TrackError

log = logging.getLogger("gateway.track_api")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
OK = b"{}"
REALM = 'Basic realm="Customer.io Track API"'

Body = dict[str, Any]
Mapper = Callable[[dict[str, str], Body], list[mapping.Call]]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: the app's wrapper that counts an endpoint's answers and adds CORS (Handlers.observed)
Observed = Callable[[str, Handler], Handler]

class BatchBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/v2/batch``: each operation kept as sent, to be measured and decoded on its own."""

    batch: list[msgspec.Raw]


_batch_decoder = msgspec.json.Decoder(BatchBody)


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(site id, API key) from ``Authorization: Basic base64(SITE_ID:API_KEY)``."""
    if not header:
        return None
    scheme, _, cred = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(cred.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    site_id, sep, api_key = decoded.partition(":")
    return (site_id, api_key) if sep else None


class TrackKeys:
    """Track credentials → source.  Every source's pair is compared, each half
    with ``hmac.compare_digest`` and no early exit, so the time an answer
    takes says nothing about which part, or which source, came close."""

    def __init__(self, sources: Iterable[SourceConfig]) -> None:
        self._pairs = [(s.track_api.site_id.encode(), s.track_api.api_key.encode(), s)
                       for s in sources if s.kind == "track_api" and s.track_api is not None]

    def source_for(self, header: str | None) -> SourceConfig | None:
        creds = basic_credentials(header)
        if creds is None:
            return None
        site_id, api_key = (c.encode("utf-8", "surrogateescape") for c in creds)
        found = None
        for known_site, known_key, source in self._pairs:
            if hmac.compare_digest(known_site, site_id) & hmac.compare_digest(known_key, api_key):
                found = found or source
        return found

    def __len__(self) -> int:
        return len(self._pairs)


def track_error_body(version: int, code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """Track's shape of an error (v1 ``meta.errors``, v2 ``errors[]``) plus ``code`` and ``message``."""
    body: dict[str, Any] = {"code": code, "message": message}
    if field:
        body["field"] = field
    if version == 1:
        body["meta"] = {"errors": [message]}
    else:
        body["errors"] = [{"reason": code, "field": field or "", "message": message}]
    return body


def _json(status: int, payload: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=_encode(payload), content_type="application/json", headers=headers)


class Refused(Exception):
    """An answer other than 200, already shaped."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


class Endpoint(msgspec.Struct, frozen=True):
    """One Track path: its method, API version, body limit and mapping."""

    method: str
    path: str
    version: int
    map: Mapper | None  # None: /api/v2/batch, answered item by item
    body: bool = True  # False: any body is read and ignored (DELETE, suppress)


def _v1(method: str, path: str, map_: Mapper, body: bool = True) -> Endpoint:
    return Endpoint(method, path, 1, map_, body)


ENDPOINTS: tuple[Endpoint, ...] = (
    _v1("PUT", "/api/v1/customers/{identifier}", lambda p, b: mapping.v1_identify(p["identifier"], b)),
    _v1("DELETE", "/api/v1/customers/{identifier}", lambda p, b: mapping.v1_delete(p["identifier"]), body=False),
    _v1("POST", "/api/v1/customers/{identifier}/events", lambda p, b: mapping.v1_event(p["identifier"], b)),
    _v1("POST", "/api/v1/events", lambda p, b: mapping.v1_anonymous_event(b)),
    _v1("PUT", "/api/v1/customers/{identifier}/devices", lambda p, b: mapping.v1_add_device(p["identifier"], b)),
    _v1("DELETE", "/api/v1/customers/{identifier}/devices/{token}",
        lambda p, b: mapping.v1_delete_device(p["identifier"], p["token"]), body=False),
    _v1("POST", "/api/v1/customers/{identifier}/suppress", lambda p, b: mapping.v1_suppress(p["identifier"]),
        body=False),
    _v1("POST", "/api/v1/customers/{identifier}/unsuppress", lambda p, b: mapping.v1_unsuppress(p["identifier"]),
        body=False),
    _v1("POST", "/api/v1/merge_customers", lambda p, b: mapping.v1_merge(b)),
    Endpoint("POST", "/api/v2/entity", 2, lambda p, b: mapping.v2_operation(b)),
    Endpoint("POST", "/api/v2/batch", 2, None),
)


class TrackApi:
    """The Track endpoints' handlers, bound to one app."""

    def __init__(self, app: web.Application, observed: Observed) -> None:
        cfg = app[state.CONFIG]
        self.ingest = app[state.INGEST]
        self.intake = app[state.INTAKE]
        self.counters = app[state.COUNTERS]
        self.keys = TrackKeys(cfg.sources)
        self.observed = observed

    def handler(self, endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                return await self._handle(request, endpoint)
            except Refused as e:
                if e.status != 503:  # an overload was counted per call by _store
                    self.counters.bump(self.counters.rejected, e.code)
                log.info("track api: %s %s from %s: %d %s", request.method, request.path, request.remote,
                         e.status, e.message)
                resp = _json(e.status, track_error_body(endpoint.version, e.code, e.message, e.field), e.headers)
                if not request.content.is_eof():
                    resp.force_close()  # do not drain what was refused unread
                return resp
            except Exception:
                log.exception("track api: error on %s %s", request.method, request.path)
                return _json(500, track_error_body(endpoint.version, "internal", "internal error"))
        return self.observed(f"{endpoint.method} {endpoint.path}", handle)

    async def not_found(self, request: web.Request) -> web.Response:
        version = 2 if request.path.startswith("/api/v2/") else 1
        return _json(404, track_error_body(version, "not_found",
                                     f"{request.method} {request.path} is not an endpoint of the Track API"))

    def _source(self, request: web.Request) -> SourceConfig:
        source = self.keys.source_for(request.headers.get("Authorization"))
        if source is None:
            given = "Authorization" in request.headers
            raise Refused(401, "auth", "the site id and API key are not valid" if given else
                          "Basic authorization with SITE_ID:API_KEY is required", "Authorization",
                          {"WWW-Authenticate": REALM})
        request[state.SOURCE] = source.name
        return source

    async def _read(self, request: web.Request, limit: int) -> bytes:
        if request.content_length == 0 or (request.content_length is None and not request.body_exists):
            return b""  # DELETE and suppress usually send none (read_body wants one)
        try:
            body = await read_body(request, limit)
        except RequestRejected as e:
            raise Refused(400, e.rejection.reason, e.rejection.message, e.rejection.field) from None
        return body[3:] if body[:3] == BOM else body

    def _peer(self, request: web.Request) -> str | None:
        return self.ingest.client_ip(request.remote, request.headers)

    async def _prepare(self, source: SourceConfig, calls: list[mapping.Call], peer: str | None,
                       now: datetime) -> Prepared:
        """``Ingest.prepare_calls`` within ingest's share of the loop."""
        return await self.intake.prepare(self.ingest.prepare_calls, source, calls, peer, now)

    async def _store(self, source: SourceConfig, prepared: Prepared) -> None:
        """Append what a request prepared (only calls that passed: a rejected
        one was refused before); a 503 (Refused) when the spool cannot store it."""
        try:
            await self.intake.store(prepared, "strict")
        except (SpoolFull, StorageFailed) as e:
            log.warning("track api: 503 for %d call(s): %s", len(prepared.rows), e)
            raise Refused(503, "overload", f"the gateway cannot store calls right now: {e}", None,
                          {"Retry-After": RETRY_AFTER}) from None

    async def _handle(self, request: web.Request, endpoint: Endpoint) -> web.Response:
        source = self._source(request)
        limit = MAX_BATCH_BYTES if endpoint.map is None else MAX_REQUEST_BYTES
        raw = await self._read(request, limit)
        now = datetime.now(timezone.utc)
        if endpoint.map is None:
            return await self._batch(source, raw, self._peer(request), now)
        body: Body = {}
        if endpoint.body:
            body = _object_body(raw, allow_empty=endpoint.method == "PUT")
        try:
            calls = endpoint.map(dict(request.match_info), body)
        except TrackError as e:
            raise Refused(400, e.code, e.message, e.field) from None
        prepared = await self._prepare(source, calls, self._peer(request), now)
        if prepared.rejections:
            # The mapping writes calls that pass; a source transform or a
            # check that disagrees costs the whole Track call, never half of it.
            r = prepared.rejections[0]
            raise Refused(400, r.reason, r.message, r.field)
        await self._store(source, prepared)
        return web.Response(body=OK, content_type="application/json")

    async def _batch(self, source: SourceConfig, raw: bytes, peer: str | None, now: datetime) -> web.Response:
        """Each operation is measured, mapped and checked on its own; the good
        ones are stored (all in one append), the others answered in a 207."""
        try:
            envelope = _batch_decoder.decode(raw)
        except msgspec.ValidationError as e:
            raise Refused(400, "json", f"the body must be {{\"batch\": [operation, ...]}}: {e}", "batch") from None
        except BAD_JSON as e:
            raise Refused(400, "json", f"the body is not valid JSON: {e}") from None
        stored = Prepared(source, [], [], [])
        failed: list[dict[str, Any]] = []
        for i, item in enumerate(envelope.batch):
            try:
                if len(item) > MAX_REQUEST_BYTES:
                    raise TrackError("size", f"the operation is {len(item)} bytes; each operation of a batch "
                                     f"may have at most {MAX_REQUEST_BYTES}", "")
                try:
                    op = _decode(item)
                except BAD_JSON as e:
                    raise TrackError("json", f"the operation is not valid JSON: {e}", "") from None
                prepared = await self._prepare(source, mapping.v2_operation(op), peer, now)
                if prepared.rejections:
                    r = prepared.rejections[0]
                    raise TrackError(r.reason, r.message, r.field)
            except TrackError as e:
                self.counters.bump(self.counters.rejected, e.code)
                failed.append({"batch_index": i, "reason": e.code, "field": e.field or "", "message": e.message})
                continue
            stored.merge(prepared)
        await self._store(source, stored)
        if failed:
            log.info("track api: %d of %d batch operation(s) refused: %s", len(failed), len(envelope.batch),
                     failed[0]["message"])
            return _json(207, {"code": "partial",
                               "message": f"{len(failed)} of {len(envelope.batch)} operation(s) were invalid; "
                                          "the others were stored",
                               "errors": failed})
        return web.Response(body=OK, content_type="application/json")


def _object_body(raw: bytes, *, allow_empty: bool) -> Body:
    if not raw.strip():
        if allow_empty:
            return {}
        raise Refused(400, "json", "a JSON object body is required", "body")
    try:
        doc = _decode(raw)
    except BAD_JSON as e:
        raise Refused(400, "json", f"the body is not valid JSON: {e}", "body") from None
    if not isinstance(doc, dict):
        raise Refused(400, "json", "the body must be a JSON object", "body")
    return doc


def setup_track_api_routes(app: web.Application, observed: Observed) -> None:
    """Add the Track endpoints, and a JSON 404 for any other ``/api/`` path
    (wrong methods included), when a source of ``kind: track_api`` exists."""
    api = TrackApi(app, observed)
    if not api.keys:
        return
    for endpoint in ENDPOINTS:
        app.router.add_route(endpoint.method, endpoint.path, api.handler(endpoint))
    app.router.add_route("*", "/api/{tail:.*}", observed("/api/*", api.not_found))
