"""Tracking pixels: one call carried by the query of a GET, for e-mail opens
and pages that run no JavaScript (docs/pipelines-api.md, "Tracking pixels").

* Segment's form, ``GET /v1/pixel/track|page?data=BASE64``: ``data`` is the
  call as JSON, ``writeKey`` inside it, in standard or URL-safe base64, with
  or without padding.  Without ``data``, the query's fields are the call, as
  in RudderStack's form (Segment documents that too).
* RudderStack's form, ``GET /pixel/v1/track|page?writeKey=KEY&...``: every
  other parameter is a field of the call and dotted names nest
  (``properties.plan=pro`` → ``{"properties": {"plan": "pro"}}``); values
  stay strings.  As RudderStack's own gateway does, the first of repeated
  parameters counts, quotes around ``anonymousId`` are dropped, the path
  decides the call's type, and an empty page ``name`` is ``Unknown Page``.

Every answer is ``200`` with a 1x1 transparent GIF, in every mode: an
``<img>`` cannot read an error, and an error status would show a broken
image in the reader's e-mail.  So problems are never answered; each is
logged and counted in ``gateway_calls_rejected_total{reason}``, and a good
call takes the path of every other call (``Ingest.prepare``: auth, checks,
enrichment, source transforms; then the spool).  A ``HEAD`` (link checkers,
mail scanners) is answered the same and stores nothing.

The query → call part is pure functions, tested apart from the server.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
from time import perf_counter
from typing import Any, Callable, Mapping

import msgspec
from aiohttp import web
from multidict import MultiMapping

from gateway import app_state as state
from gateway.events import encoder
from gateway.ingest.call_checks import RequestRejected
from gateway.spool import SpoolFull, StorageFailed

log = logging.getLogger("gateway")

#: 1x1, one transparent colour (GIF89a with a graphic control extension)
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
#: every open must reach the gateway, so no cache may answer for it
NO_CACHE = {"Cache-Control": "no-cache, no-store, must-revalidate, max-age=0", "Pragma": "no-cache",
            "Expires": "0"}
KINDS = ("track", "page")
SEGMENT = "segment"
RUDDERSTACK = "rudderstack"
#: form → path of each kind
PATHS = {SEGMENT: "/v1/pixel/{kind}", RUDDERSTACK: "/pixel/v1/{kind}"}
UNKNOWN_PAGE = "Unknown Page"  # RudderStack's name for a page pixel with an empty name
_URLSAFE = str.maketrans("-_", "+/")

Query = MultiMapping[str]


class PixelProblem(Exception):
    """A pixel whose query does not make a call; ``reason`` is the metrics label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def decode_base64(text: str) -> bytes:
    """Standard or URL-safe base64, padded or not.

    A ``+`` that was not percent-encoded arrives as a space (form decoding of
    the query), and base64 has no spaces, so a space is read as ``+``."""
    s = text.strip().replace(" ", "+").translate(_URLSAFE).rstrip("=")
    if len(s) % 4 == 1:
        raise PixelProblem("encoding", f"data is not base64: {len(s)} characters cannot be base64")
    try:
        return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except binascii.Error as e:
        raise PixelProblem("encoding", f"data is not base64: {e}") from None


def call_from_data(data: str) -> dict[str, Any]:
    """Segment's ``data``: the call as base64 JSON (or as JSON, since Segment
    calls the base64 optional; base64 never starts with ``{``)."""
    raw = data.strip().encode() if data.lstrip().startswith("{") else decode_base64(data)
    try:
        call = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PixelProblem("json", f"data is not JSON: {e}") from None
    if not isinstance(call, dict):
        raise PixelProblem("json", f"data must be a JSON object, not {type(call).__name__}")
    return call


def set_dotted(call: dict[str, Any], name: str, value: str) -> None:
    """``call[a][b] = value`` for the parameter ``a.b``; a name that is both a
    value and an object (``properties=x&properties.plan=pro``) is refused."""
    parts = name.split(".")
    if not all(parts):
        raise PixelProblem("bad_field", f"query parameter {name!r}: an empty name between dots")
    node = call
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise PixelProblem("bad_field", f"query parameter {name!r}: {'.'.join(parts[:depth + 1])} "
                                            "is already a value, so it cannot hold fields")
        node = child
    last = parts[-1]
    if isinstance(node.get(last), dict):
        raise PixelProblem("bad_field", f"query parameter {name!r} is already an object of fields")
    node[last] = value


def call_from_fields(query: Query) -> dict[str, Any]:
    """Each parameter a field, dotted names nested, the first of repeats kept."""
    call: dict[str, Any] = {}
    for name in dict.fromkeys(query):  # unique names, in order
        set_dotted(call, name, query.getone(name))
    return call


def segment_call(query: Query) -> dict[str, Any]:
    """The call of a ``/v1/pixel/...`` request."""
    data = query.get("data")
    return call_from_fields(query) if data is None else call_from_data(data)


def rudderstack_call(query: Query, kind: str) -> dict[str, Any]:
    """The call of a ``/pixel/v1/...`` request, as RudderStack's gateway
    builds it (its handle_http_pixel.go); ``writeKey`` stays in the call,
    where ingest reads it and removes it."""
    call = call_from_fields(query)
    anonymous_id = call.get("anonymousId")
    if isinstance(anonymous_id, str) and len(anonymous_id) >= 2 and anonymous_id[0] == anonymous_id[-1] == '"':
        call["anonymousId"] = anonymous_id[1:-1]
    if kind == "page" and call.get("name") == "":
        call["name"] = UNKNOWN_PAGE
    return call


def pixel_call(form: str, kind: str, query: Query) -> dict[str, Any]:
    """The call a pixel request carries (``type`` is set later, from ``kind``)."""
    return segment_call(query) if form == SEGMENT else rudderstack_call(query, kind)


def gif() -> web.Response:
    return web.Response(body=GIF, content_type="image/gif", headers=NO_CACHE)


class Pixels:
    """The pixel endpoints of one app: each request is taken through ingest
    and answered with the GIF, whatever happened."""

    def __init__(self, app: web.Application) -> None:
        self.ingest = app[state.INGEST]
        self.intake = app[state.INTAKE]
        self.counters = app[state.COUNTERS]

    def add_routes(self, router: web.UrlDispatcher,
                   observed: Callable[[str, Callable[[web.Request], Any]], Any]) -> None:
        """GET (and HEAD) routes for both forms and both kinds, counted by
        ``observed`` like the other endpoints."""
        for form, template in PATHS.items():
            for kind in KINDS:
                path = template.format(kind=kind)
                router.add_get(path, observed(path, functools.partial(self.handle, form=form, kind=kind)))

    async def handle(self, request: web.Request, *, form: str, kind: str) -> web.Response:
        if request.method == "HEAD":
            return gif()
        try:
            await self._take(request, form, kind)
        except Exception:  # the answer is the GIF even then; the log says why
            log.exception("error on pixel %s", request.path)
            self.counters.bump(self.counters.rejected, "internal")
        return gif()

    def _reject(self, request: web.Request, reason: str, message: str) -> None:
        self.counters.bump(self.counters.rejected, reason)
        log.info("rejected pixel %s from %s: %s", request.path, request.remote, message)

    async def _take(self, request: web.Request, form: str, kind: str) -> None:
        """Store the call if it is good; count and log it if not."""
        ingest = self.ingest
        # Only what ingest needs from the request: the key comes from the
        # pixel alone, never from an Authorization a browser might replay.
        forwarded = request.headers.get("X-Forwarded-For")
        headers: Mapping[str, str] = {"X-Forwarded-For": forwarded} if forwarded else {}
        try:
            body = encoder.encode(pixel_call(form, kind, request.query))
            limit = ingest.body_limit(kind)
            if len(body) > limit:
                raise PixelProblem("size", f"the call is {len(body)} bytes; the limit is {limit} "
                                           "(server.max_event_bytes)")
            prepared = await self.intake.prepare(ingest.prepare, kind, body, headers, request.remote)
        except PixelProblem as p:
            self._reject(request, p.reason, p.message)
            return
        except RequestRejected as e:
            self._reject(request, e.rejection.reason, e.rejection.message)
            return
        for rejection in prepared.rejections:
            log.info("rejected pixel %s from %s: %s", request.path, request.remote, rejection.message)
        try:
            await self.intake.store(prepared)
        except (SpoolFull, StorageFailed) as e:
            log.warning("pixel %s not stored (answered with the GIF all the same): %s", request.path, e)
