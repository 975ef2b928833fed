"""A strict fake of the Customer.io endpoints the gateway uses, on a real socket.

It answers as Customer.io's API references describe it (set down in
docs/customerio-apis.md) and refuses what Customer.io would refuse, so a test
that passes here sends what Customer.io accepts:

* Track v2 ``POST /api/v2/batch`` (docs/customerio-apis.md §2-§5, with the op
  schemas of docs/customerio-apis.md §4 BD-4 and BD-5): Basic ``SITE_ID:API_KEY``,
  a ``{"batch": [...]}`` body, every op checked for its type and action,
  identifiers, integer timestamps, names and sizes.  An invalid op is a per-item error in a 207
  (the others are accepted, docs/customerio-apis.md §7.2); a body that is not a
  batch is a 400; a body over 500 KB is a 413 (docs/customerio-apis.md §7.1).
* Track v1 ``POST /api/v1/metrics`` (docs/customerio-apis.md §9).
* Pipelines ``POST /v1/batch`` (docs/customerio-apis.md §4 and §6):
  Basic ``API_KEY:``; with ``X-Strict-Mode: 1`` a bad call or a bad key is a
  400/401 and nothing of the batch is accepted; without it the answer is 200
  and bad calls vanish, as lax mode does.

Where "32kb" and "500kb" could be read as 1000s or 1024s of bytes, the fake
takes the smaller reading (docs/customerio-apis.md §5 SZ-1), so a sender that
fits here fits either way.

It records every request (``requests``) and what it accepted (``track_ops``,
``metrics``, ``pipelines_calls``), and can be told to misbehave (``fail``,
``item_errors``, ``poison``, ``max_body``).  Nothing here imports the
gateway's plugins: the rules are read from the documents, not from the code
under test.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import pytest
from aiohttp import web

from gateway.http_client import HttpClient, HttpPool, Throttle

SITE_ID = "fake-site-id"
TRACK_API_KEY = "fake-track-api-key"
PIPELINES_API_KEY = "fake-pipelines-api-key"

# docs/customerio-apis.md §5
MAX_OP = 32_000  # Track v2: each op of a batch
MAX_BATCH = 500_000  # Track v2 and Pipelines: a batch request
MAX_CALL = 32_000  # Pipelines: each call of a batch

# docs/customerio-apis.md §5 SZ-4: people, objects, relationships and events
MAX_ID = 150
MAX_ATTR_NAME = 150
MAX_ATTR_VALUE = 1000
MAX_ATTRS = 300
MAX_EVENT_NAME = 100
MAX_EVENT_DATA = 100_000

# docs/customerio-apis.md §4 BD-5
ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")  # an event id
STRINGIFIED_INT = re.compile(r"[1-9][0-9]*")  # an object type id
PERSON_IDS = frozenset({"id", "email", "cio_id", "phone"})  # exactly one of them names a person

# docs/customerio-apis.md §4 BD-4: (required keys, optional keys) per action; type and action are always there
PERSON: dict[str, tuple[set[str], set[str]]] = {
    "identify": ({"identifiers"}, {"timestamp", "attributes", "cio_relationships"}),
    "delete": ({"identifiers"}, set()),
    "event": ({"identifiers", "name"}, {"id", "timestamp", "attributes"}),
    "page": ({"identifiers", "name"}, {"id", "timestamp", "attributes"}),
    "screen": ({"identifiers", "name"}, {"id", "timestamp", "attributes"}),
    "add_relationships": ({"identifiers", "cio_relationships"}, set()),
    "delete_relationships": ({"identifiers", "cio_relationships"}, set()),
    "add_device": ({"identifiers", "device"}, set()),
    "delete_device": ({"identifiers", "device"}, set()),
    "merge": ({"primary", "secondary"}, set()),
    "suppress": ({"identifiers"}, set()),
    "unsuppress": ({"identifiers"}, set()),
}
OBJECT: dict[str, tuple[set[str], set[str]]] = {
    "identify": ({"identifiers"}, {"attributes", "cio_relationships"}),
    "identify_anonymous": ({"identifiers"}, {"attributes", "cio_relationships"}),
    "delete": ({"identifiers"}, set()),
    "add_relationships": ({"identifiers", "cio_relationships"}, set()),
    "delete_relationships": ({"identifiers", "cio_relationships"}, set()),
}
DELIVERY: dict[str, tuple[set[str], set[str]]] = {
    "event": ({"identifiers", "name", "attributes"}, set()),
}
SCHEMAS = {"person": PERSON, "object": OBJECT, "delivery": DELIVERY}
DELIVERY_V2_METRICS = frozenset({"opened", "converted", "delivered"})
DELIVERY_V1_METRICS = frozenset({"bounced", "clicked", "converted", "deferred", "delivered", "dropped", "opened",
                                 "spammed"})
PIPELINES_TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})


def compact(value: Any) -> bytes:
    """The size rule's encoding: compact UTF-8 JSON (docs/customerio-track-v2.md §6.1 L-1)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Invalid(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _string(value: Any, where: str, max_bytes: int | None = None) -> None:
    if not isinstance(value, str) or not value:
        raise Invalid(where, f"{where} must be a non-empty string")
    if max_bytes is not None and len(value.encode("utf-8")) > max_bytes:
        raise Invalid(where, f"{where} is longer than {max_bytes} bytes")


def _integer(value: Any, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise Invalid(where, f"{where} must be an integer (unix seconds)")


def _person_identifiers(value: Any, where: str, extra: frozenset[str] = frozenset()) -> None:
    if not isinstance(value, dict) or len(value) != 1:
        raise Invalid(where, f"{where} must hold exactly one identifier; you cannot pass multiple identifiers")
    (key, v), = value.items()
    if key not in PERSON_IDS | extra:
        raise Invalid(where, f"{where}.{key} is not an identifier here")
    _string(v, f"{where}.{key}", MAX_ID if key == "id" else None)


def _object_identifiers(value: Any, where: str) -> None:
    if not isinstance(value, dict) or set(value) != {"object_type_id", "object_id"}:
        raise Invalid(where, f"{where} must be exactly object_type_id and object_id")
    if not isinstance(value["object_type_id"], str) or not STRINGIFIED_INT.fullmatch(value["object_type_id"]):
        raise Invalid(f"{where}.object_type_id", "object_type_id must be a stringified integer")
    _string(value["object_id"], f"{where}.object_id", MAX_ID)


def _attributes(value: Any, where: str, limited: bool) -> None:
    if not isinstance(value, dict):
        raise Invalid(where, f"{where} must be an object")
    if not limited:
        return
    if len(value) > MAX_ATTRS:
        raise Invalid(where, f"more than {MAX_ATTRS} attributes")
    for k, v in value.items():
        if len(k.encode("utf-8")) > MAX_ATTR_NAME:
            raise Invalid(f"{where}.{k[:20]}", f"attribute name longer than {MAX_ATTR_NAME} bytes")
        size = len(v.encode("utf-8")) if isinstance(v, str) else len(compact(v)) if isinstance(v, (dict, list)) else 0
        if size > MAX_ATTR_VALUE:
            raise Invalid(f"{where}.{k}", f"property value cannot be longer than {MAX_ATTR_VALUE} bytes")


def _relationships(value: Any, kind: str, action: str) -> None:
    if not isinstance(value, list) or not value:
        raise Invalid("cio_relationships", "cio_relationships must be a non-empty array")
    for i, rel in enumerate(value):
        where = f"cio_relationships[{i}]"
        if not isinstance(rel, dict) or "identifiers" not in rel or set(rel) - {"identifiers",
                                                                                "relationship_attributes"}:
            raise Invalid(where, "a relationship is identifiers and optional relationship_attributes")
        if kind == "person":
            _object_identifiers(rel["identifiers"], f"{where}.identifiers")
        elif action == "identify_anonymous":
            ids = rel["identifiers"]
            if not isinstance(ids, dict) or set(ids) != {"anonymous_id"}:
                raise Invalid(f"{where}.identifiers", "identify_anonymous relates an anonymous_id")
            _string(ids["anonymous_id"], f"{where}.identifiers.anonymous_id")
        else:
            _person_identifiers(rel["identifiers"], f"{where}.identifiers")
        if "relationship_attributes" in rel:
            _attributes(rel["relationship_attributes"], f"{where}.relationship_attributes", True)


def validate_track_op(op: Any) -> None:
    """One Track v2 op against its type/action schema; raises Invalid."""
    if not isinstance(op, dict):
        raise Invalid("", "each element of batch must be an object")
    kind, action = op.get("type"), op.get("action")
    schema = SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None or not isinstance(kind, str):
        raise Invalid("type", f"type must be person, object or delivery; got {kind!r}")
    if not isinstance(action, str) or action not in schema:
        raise Invalid("action", f"{action!r} is not an action of type {kind}")
    required, optional = schema[action]
    keys = set(op) - {"type", "action"}
    if missing := required - keys:
        raise Invalid(sorted(missing)[0], f"{sorted(missing)[0]} is required for {kind} {action}")
    if unknown := keys - required - optional:
        raise Invalid(sorted(unknown)[0], f"{sorted(unknown)[0]} is not part of {kind} {action}")
    if len(compact(op)) > MAX_OP:
        raise Invalid("", f"each request in a batch must be {MAX_OP} bytes or smaller")
    if "timestamp" in op:
        _integer(op["timestamp"], "timestamp")
    if kind == "person":
        if action == "merge":
            _person_identifiers(op["primary"], "primary")
            _person_identifiers(op["secondary"], "secondary")
        else:
            # anonymous events: docs/customerio-track-v2.md D-1 (what Customer.io takes, §4 BD-5)
            anon = frozenset({"anonymous_id"}) if action in ("event", "page", "screen") else frozenset()
            _person_identifiers(op["identifiers"], "identifiers", anon)
        if action in ("event", "page", "screen"):
            _string(op["name"], "name", MAX_EVENT_NAME if action == "event" else None)
            if "id" in op and (not isinstance(op["id"], str) or not ULID.fullmatch(op["id"])):
                raise Invalid("id", "id must be a ULID")
            if "attributes" in op:
                _attributes(op["attributes"], "attributes", False)
                if len(compact(op["attributes"])) > MAX_EVENT_DATA:
                    raise Invalid("attributes", f"event data is over {MAX_EVENT_DATA} bytes")
        elif "attributes" in op:
            _attributes(op["attributes"], "attributes", True)
        if action in ("add_device", "delete_device"):
            dev = op["device"]
            allowed = {"token", "platform", "last_used", "attributes"} if action == "add_device" else {"token"}
            if not isinstance(dev, dict) or set(dev) - allowed:
                raise Invalid("device", f"device may hold only {sorted(allowed)}")
            _string(dev.get("token"), "device.token")
            if action == "add_device":
                if dev.get("platform") not in ("ios", "android"):
                    raise Invalid("device.platform", "platform must be ios or android")
                if "last_used" in dev:
                    _integer(dev["last_used"], "device.last_used")
                if "attributes" in dev:
                    _attributes(dev["attributes"], "device.attributes", False)
    elif kind == "object":
        _object_identifiers(op["identifiers"], "identifiers")
        if "attributes" in op:
            _attributes(op["attributes"], "attributes", True)
    else:
        ids = op["identifiers"]
        if not isinstance(ids, dict) or set(ids) != {"id"}:
            raise Invalid("identifiers", "a delivery is identified by its id")
        _string(ids["id"], "identifiers.id")
        if op["name"] not in DELIVERY_V2_METRICS:
            raise Invalid("name", "name must be opened, converted or delivered")
        attrs = op["attributes"]
        if not isinstance(attrs, dict):
            raise Invalid("attributes", "attributes must be an object")
        _string(attrs.get("device_token"), "attributes.device_token")
    if "cio_relationships" in op:
        _relationships(op["cio_relationships"], kind, action)


def validate_metric(body: Any) -> None:
    """``POST /api/v1/metrics`` (docs/customerio-apis.md §9 V1-1)."""
    if not isinstance(body, dict):
        raise Invalid("", "the body must be an object")
    if unknown := set(body) - {"delivery_id", "metric", "timestamp", "recipient", "reason", "href", "metadata"}:
        raise Invalid(sorted(unknown)[0], "unknown field")
    _string(body.get("delivery_id"), "delivery_id")
    if body.get("metric") not in DELIVERY_V1_METRICS:
        raise Invalid("metric", f"metric must be one of {sorted(DELIVERY_V1_METRICS)}")
    if "timestamp" in body:
        _integer(body["timestamp"], "timestamp")
    for key in ("recipient", "reason", "href"):
        if key in body:
            _string(body[key], key)
    if "metadata" in body and not isinstance(body["metadata"], dict):
        raise Invalid("metadata", "metadata must be an object")


def _present(v: Any) -> bool:
    return (isinstance(v, str) and v != "") or (isinstance(v, (int, float)) and not isinstance(v, bool))


def validate_pipelines_call(call: Any) -> None:
    """The fields strict mode requires (docs/customerio-apis.md §6.2)."""
    if not isinstance(call, dict):
        raise Invalid("", "a call must be an object")
    t = call.get("type")
    if t not in PIPELINES_TYPES:
        raise Invalid("type", f"type must be one of {sorted(PIPELINES_TYPES)}")
    if len(compact(call)) > MAX_CALL:
        raise Invalid("", f"a call must be {MAX_CALL} bytes or smaller")
    if t != "group" and not (_present(call.get("userId")) or _present(call.get("anonymousId"))):
        raise Invalid("userId", f"{t} requires userId or anonymousId")
    if t == "track" and not (isinstance(call.get("event"), str) and call["event"]):
        raise Invalid("event", "track requires event")
    if t == "group" and not _present(call.get("groupId")):
        raise Invalid("groupId", "group requires groupId")
    if t == "alias" and not _present(call.get("previousId")):
        raise Invalid("previousId", "alias requires previousId")


@dataclass
class Fault:
    """What the next matching request(s) get instead of the normal answer."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1
    #: per-item errors (each with its batch_index); the other items are accepted
    errors: list[dict[str, Any]] | None = None


@dataclass
class Received:
    """One request as it arrived, and the status it got."""

    api: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any
    status: int = 0
    response: Any = None


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=compact(payload), content_type="application/json", headers=headers)


def _basic(header: str | None) -> tuple[str, str] | None:
    if not header or not header.startswith("Basic "):
        return None
    try:
        user, sep, password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


class FakeCustomerIO:
    """Track v2 (+ v1 metrics) and Pipelines in one aiohttp app."""

    def __init__(self, site_id: str = SITE_ID, track_api_key: str = TRACK_API_KEY,
                 pipelines_api_key: str = PIPELINES_API_KEY) -> None:
        self.track_credentials = (site_id, track_api_key)
        self.pipelines_credentials = (pipelines_api_key, "")
        self.url = ""
        self.requests: list[Received] = []
        self.track_ops: list[dict[str, Any]] = []
        self.metrics: list[dict[str, Any]] = []
        self.pipelines_calls: list[dict[str, Any]] = []
        self.faults: dict[str, list[Fault]] = {"track": [], "metrics": [], "pipelines": []}
        #: a request holding an item for which this is true gets a 400 as a whole
        self.poison: dict[str, Callable[[dict[str, Any]], bool]] = {}
        #: bodies over this many bytes get a 413 (track) or 400 (pipelines)
        self.max_body: dict[str, int] = {"track": MAX_BATCH, "pipelines": MAX_BATCH}
        self._changed = asyncio.Event()

    # -- telling it what to do ---------------------------------------------

    def fail(self, api: str, status: int, *, times: int = 1, body: Any = None,
             headers: dict[str, str] | None = None) -> None:
        """The next ``times`` requests to ``api`` get ``status`` (nothing is accepted)."""
        self.faults[api].append(Fault(status, body, headers or {}, times))

    def item_errors(self, api: str, errors: list[dict[str, Any]], *, status: int = 207, times: int = 1) -> None:
        """The next request(s) answer ``status`` with these per-item errors; other items are accepted."""
        self.faults[api].append(Fault(status, None, {}, times, errors))

    @property
    def track_requests(self) -> list[Received]:
        return [r for r in self.requests if r.api == "track"]

    @property
    def pipelines_requests(self) -> list[Received]:
        return [r for r in self.requests if r.api == "pipelines"]

    async def wait_for(self, what: Callable[[], bool], timeout: float = 10.0) -> None:
        """Until ``what()`` is true, or fail the test."""
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                raise AssertionError(f"the fake did not get what was expected; requests: "
                                     f"{[(r.path, r.status) for r in self.requests]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), 0.2)
            except asyncio.TimeoutError:
                pass

    # -- the app ---------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)  # the fake decides about sizes
        app.router.add_post("/api/v2/batch", self._track_batch)
        app.router.add_post("/api/v1/metrics", self._metric)
        app.router.add_post("/v1/batch", self._pipelines_batch)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def _receive(self, api: str, request: web.Request) -> Received:
        body = await request.read()
        try:
            doc = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            doc = None
        rec = Received(api, request.method, request.path, dict(request.headers), body, doc)
        self.requests.append(rec)
        return rec

    def _answer(self, rec: Received, resp: web.Response) -> web.Response:
        rec.status = resp.status
        body = resp.body if isinstance(resp.body, bytes) else b""
        try:
            rec.response = json.loads(body) if body else None
        except ValueError:
            rec.response = body.decode("utf-8", "replace")
        self._changed.set()
        return resp

    def _fault(self, api: str) -> Fault | None:
        queue = self.faults[api]
        if not queue:
            return None
        fault = queue[0]
        fault.times -= 1
        if fault.times <= 0:
            queue.pop(0)
        return fault

    @staticmethod
    def _fault_response(fault: Fault) -> web.Response:
        if isinstance(fault.body, (bytes, str)):
            return web.Response(status=fault.status, body=fault.body, headers=fault.headers)
        body = fault.body if fault.body is not None else {"errors": [{"reason": "fault",
                                                                       "message": f"injected {fault.status}"}]}
        return _json(fault.status, body, fault.headers)

    async def _not_found(self, request: web.Request) -> web.Response:
        rec = await self._receive("other", request)
        return self._answer(rec, _json(404, {"errors": [{"reason": "not_found", "message": "Not Found"}]}))

    async def _track_batch(self, request: web.Request) -> web.Response:
        rec = await self._receive("track", request)
        if _basic(request.headers.get("Authorization")) != self.track_credentials:
            return self._answer(rec, _json(401, {"meta": {"error": "Unauthorized request"}}))
        fault = self._fault("track")
        if fault is not None and fault.errors is None:
            return self._answer(rec, self._fault_response(fault))
        if len(rec.body) > self.max_body["track"]:
            return self._answer(rec, _json(413, {"errors": [{"reason": "too_large",
                                                             "message": "request entity too large"}]}))
        problem = None
        if request.content_type != "application/json":
            problem = ("Content-Type", "send application/json")
        elif not isinstance(rec.json, dict) or set(rec.json) != {"batch"} or not isinstance(rec.json["batch"], list):
            problem = ("batch", 'the body must be {"batch": [...]}')
        elif not rec.json["batch"]:
            problem = ("batch", "batch is empty")
        elif "track" in self.poison and any(isinstance(op, dict) and self.poison["track"](op)
                                            for op in rec.json["batch"]):
            problem = ("batch", "the request is malformed (injected)")
        if problem is not None:
            return self._answer(rec, _json(400, {"errors": [{"reason": "invalid", "field": problem[0],
                                                             "message": problem[1]}]}))
        ops = rec.json["batch"]
        errors: list[dict[str, Any]] = []
        for i, op in enumerate(ops):
            try:
                validate_track_op(op)
            except Invalid as e:
                errors.append({"batch_index": i, "reason": "invalid", "field": e.field, "message": e.message})
        if fault is not None and fault.errors is not None:
            errors.extend(fault.errors)
        bad = {e.get("batch_index") for e in errors}
        self.track_ops.extend(op for i, op in enumerate(ops) if i not in bad)
        if errors:
            return self._answer(rec, _json(fault.status if fault is not None else 207, {"errors": errors}))
        return self._answer(rec, _json(200, {}))

    async def _metric(self, request: web.Request) -> web.Response:
        rec = await self._receive("metrics", request)
        if _basic(request.headers.get("Authorization")) != self.track_credentials:
            return self._answer(rec, _json(401, {"meta": {"error": "Unauthorized request"}}))
        fault = self._fault("metrics")
        if fault is not None:
            return self._answer(rec, self._fault_response(fault))
        try:
            if request.content_type != "application/json":
                raise Invalid("Content-Type", "send application/json")
            validate_metric(rec.json)
        except Invalid as e:
            return self._answer(rec, _json(400, {"errors": [{"reason": "invalid", "field": e.field,
                                                             "message": e.message}]}))
        self.metrics.append(rec.json)
        return self._answer(rec, _json(200, {}))

    async def _pipelines_batch(self, request: web.Request) -> web.Response:
        rec = await self._receive("pipelines", request)
        strict = request.headers.get("X-Strict-Mode") == "1"

        def refuse(status: int, errors: list[dict[str, Any]]) -> web.Response:
            # lax mode: "Logged but return HTTP 200 success"
            return self._answer(rec, _json(status, {"errors": errors}) if strict else _json(200, {}))

        if _basic(request.headers.get("Authorization")) != self.pipelines_credentials:
            return refuse(401, [{"reason": "unauthorized", "message": "invalid API key"}])
        fault = self._fault("pipelines")
        if fault is not None and fault.errors is None:
            return self._answer(rec, self._fault_response(fault))
        if len(rec.body) > self.max_body["pipelines"]:
            return refuse(400, [{"reason": "too_large", "field": "batch",
                                 "message": f"a batch must be {self.max_body['pipelines']} bytes or smaller"}])
        doc = rec.json
        if request.content_type != "application/json" or not isinstance(doc, dict) or \
                not isinstance(doc.get("batch"), list) or set(doc) - {"batch", "context", "integrations", "sentAt"}:
            return refuse(400, [{"reason": "invalid", "field": "batch",
                                 "message": 'the body must be {"batch": [...]}'}])
        calls = doc["batch"]
        errors: list[dict[str, Any]] = []
        for i, call in enumerate(calls):
            try:
                validate_pipelines_call(call)
                if "pipelines" in self.poison and self.poison["pipelines"](call):
                    raise Invalid("", "the call is malformed (injected)")
            except Invalid as e:
                errors.append({"batch_index": i, "reason": "invalid", "field": e.field, "message": e.message})
        if errors and strict:
            return refuse(400, errors)
        if fault is not None and fault.errors is not None:
            errors.extend(fault.errors)
        bad = {e.get("batch_index") for e in errors}
        self.pipelines_calls.extend(c for i, c in enumerate(calls) if i not in bad)
        if fault is not None and fault.errors is not None:
            return self._answer(rec, _json(fault.status, {"errors": fault.errors}))
        return self._answer(rec, _json(200, {}))


@pytest.fixture
async def cio(aiohttp_server: Any) -> AsyncIterator[FakeCustomerIO]:
    """A running fake; ``cio.url`` is its base URL (give it as ``endpoint``)."""
    fake = FakeCustomerIO()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    yield fake


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    """An HTTP client as the engine builds one for every destination, with a
    rate limit too high to be felt; its pool is closed at the end."""
    pool = HttpPool()
    yield HttpClient(pool, Throttle(1e9, 1.0))
    await pool.close()
