"""From an HTTP request to calls ready for the spool: auth, decode, limits,
strict/lax validation and enrichment.

Nothing here touches aiohttp, so the rules can be read (and tested) apart from
the server; ``app.py`` feeds it the body, headers and peer address.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import itertools
import os
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Mapping

import msgspec

from gateway.config import Config, SourceConfig
from gateway.destination import Transform
from gateway.events import (
    BATCH_PATHS, CALL_TYPES, NEEDS_PERSON, OBJECT_KEYS, PATH_TYPES, STRIPPED_KEYS,
    batch_decoder, call_decoder, encoder,
)


class Rejection(msgspec.Struct, omit_defaults=True):
    """Why one call, or a whole request, was not stored."""

    reason: str  # the metrics label: auth, encoding, size, json, missing_field, ...
    message: str
    field: str | None = None
    limit: int | None = None
    index: int | None = None


class RequestRejected(Exception):
    """The whole request is unusable (auth, encoding, size, JSON)."""

    def __init__(self, status: int, rejection: Rejection) -> None:
        super().__init__(rejection.message)
        self.status = status
        self.rejection = rejection


class Prepared(msgspec.Struct):
    """What one request yields: rows for the spool and what was turned away."""

    source: SourceConfig
    rows: list[bytes]
    rejections: list[Rejection]
    dropped: list[str]  # transform drop reasons, one per dropped call


_message_ids = itertools.count()
_MESSAGE_ID_PREFIX = os.urandom(6).hex()


def new_message_id() -> str:
    """Unique across processes and restarts: a random per-process prefix and a counter."""
    return f"gw-{_MESSAGE_ID_PREFIX}-{next(_message_ids):x}"


def iso(dt: datetime) -> str:
    """ISO-8601 in UTC with milliseconds and a Z, as Segment's and Customer.io's APIs write it."""
    if dt.utcoffset():
        dt = dt.astimezone(timezone.utc)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (
        dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second, dt.microsecond // 1000)


_SECOND_PREFIX: dict[int, str] = {}
_MILLIS = tuple(".%03dZ" % i for i in range(1000))
_MILLI_OF = {m: i for i, m in enumerate(_MILLIS)}  # ".123Z" -> 123
#: "YYYY-MM-DDTHH:MM:SS" -> Unix seconds, for the shape SDKs send
_SECOND_OF: dict[str, int] = {}


def iso_ms(ms: int) -> str:
    """``iso`` for Unix milliseconds; the date-and-second part is cached."""
    sec, milli = divmod(ms, 1000)
    prefix = _SECOND_PREFIX.get(sec)
    if prefix is None:
        if len(_SECOND_PREFIX) > 4096:
            _SECOND_PREFIX.clear()
        t = time.gmtime(sec)
        prefix = _SECOND_PREFIX[sec] = "%04d-%02d-%02dT%02d:%02d:%02d" % t[:6]
    return prefix + _MILLIS[milli]


def parse_ms(value: Any) -> int | None:
    """An ISO-8601 date-time as Unix milliseconds (no zone means UTC).

    ``2026-11-23T03:00:00.123Z``, what SDKs send, is read from a cache of
    its second; everything else goes through datetime."""
    if value.__class__ is str and len(value) == 24:
        sec = _SECOND_OF.get(value[:19])
        if sec is not None:
            milli = _MILLI_OF.get(value[19:])
            if milli is not None:
                return sec * 1000 + milli
    dt = parse_iso(value)
    if dt is None:
        return None
    ms = round(dt.timestamp() * 1000)
    if len(value) == 24 and (milli := _MILLI_OF.get(value[19:])) is not None:
        if len(_SECOND_OF) > 4096:
            _SECOND_OF.clear()
        _SECOND_OF[value[:19]] = (ms - milli) // 1000
    return ms


def parse_iso(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


class KeyRing:
    """Write keys → sources, compared in constant time against every key."""

    def __init__(self, sources: Iterable[SourceConfig]) -> None:
        self._keys = [(k.encode(), s) for s in sources for k in s.write_keys]

    def source_for(self, key: str | None) -> SourceConfig | None:
        if not key or not isinstance(key, str):
            return None
        given = key.encode("utf-8", "surrogateescape")
        found = None
        for k, source in self._keys:
            if hmac.compare_digest(k, given):
                found = source
        return found


_HEADER_KEYS: dict[str, str | None] = {}


def key_from_header(value: str | None) -> str | None:
    """``Basic base64(KEY:)`` or ``Bearer KEY``.  Decoded headers are cached
    (the key is still compared in constant time by KeyRing)."""
    if not value:
        return None
    try:
        return _HEADER_KEYS[value]
    except KeyError:
        pass
    key = _parse_auth(value)
    if len(_HEADER_KEYS) >= 1024:
        _HEADER_KEYS.clear()
    _HEADER_KEYS[value] = key
    return key


def _parse_auth(value: str) -> str | None:
    scheme, _, cred = value.strip().partition(" ")
    scheme = scheme.lower()
    cred = cred.strip()
    if scheme == "bearer":
        return cred or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(cred, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[0] or None
    return None


class ProxyTrust:
    """Which peers' X-Forwarded-* headers are believed."""

    def __init__(self, trusted: list[str]) -> None:
        self._nets = [ipaddress.ip_network(t, strict=False) for t in trusted]
        self.any = bool(self._nets)

    def trusts(self, addr: str | None) -> bool:
        if not self._nets or not addr:
            return False
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in n for n in self._nets)

    def client_ip(self, peer: str | None, forwarded_for: str | None) -> str | None:
        if not forwarded_for or not self.trusts(peer):
            return peer
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop
        return hops[0] if hops else peer


def _present(value: Any) -> bool:
    """An identifier counts when it is a non-empty string or a number."""
    if isinstance(value, str):
        return value != ""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_call(call: Any, type_: str | None) -> Rejection | None:
    """The seed's required fields (pipelines-vs-track-api.txt), plus shape checks."""
    if not isinstance(call, dict):
        return Rejection("json", "a call must be a JSON object", "")
    t = type_ or call.get("type")
    if t not in CALL_TYPES:
        if t is None:
            return Rejection("missing_field", "type is required in a batch call", "type")
        return Rejection("bad_type", f"type must be one of {', '.join(sorted(CALL_TYPES))}; got {t!r}", "type")
    for key in OBJECT_KEYS:
        v = call.get(key)
        if v is not None and not isinstance(v, dict):
            return Rejection("bad_field", f"{key} must be an object", key)
    for key in ("userId", "anonymousId", "groupId", "previousId"):
        v = call.get(key)
        if v is not None and not isinstance(v, str) and not _present(v):
            return Rejection("bad_field", f"{key} must be a string", key)
    if t in NEEDS_PERSON and not (_present(call.get("userId")) or _present(call.get("anonymousId"))):
        return Rejection("missing_field", f"{t} requires userId or anonymousId", "userId")
    if t == "track":
        ev = call.get("event")
        if not isinstance(ev, str) or not ev:
            return Rejection("missing_field", "track requires an event name", "event")
    elif t == "group" and not _present(call.get("groupId")):
        return Rejection("missing_field", "group requires groupId", "groupId")
    elif t == "alias" and not _present(call.get("previousId")):
        return Rejection("missing_field", "alias requires previousId", "previousId")
    return None


class Enricher:
    """What the gateway adds to every call (DESIGN.md, the path of an event).

    Times are kept as integer milliseconds: a batch of a hundred calls then
    costs a hundred subtractions, not a hundred datetime round trips."""

    __slots__ = ("received_ms", "received_iso", "ip", "context", "integrations", "sent_at", "_sent_cache")

    def __init__(self, received_ms: int, ip: str | None,
                 context: dict[str, Any] | None = None, integrations: dict[str, Any] | None = None,
                 sent_at: Any = None) -> None:
        self.received_ms = received_ms
        self.received_iso = iso_ms(self.received_ms)
        self.ip = ip
        self.context = context
        self.integrations = integrations
        self.sent_at = sent_at
        self._sent_cache: tuple[Any, int | None] = (None, None)

    def _sent(self, value: Any) -> int | None:
        if self._sent_cache[0] != value:
            self._sent_cache = (value, parse_ms(value))
        return self._sent_cache[1]

    def apply(self, call: dict[str, Any], type_: str | None) -> Rejection | None:
        """Enrich ``call`` in place; a timestamp that is not ISO-8601 rejects it."""
        for key in STRIPPED_KEYS:
            if key in call:
                del call[key]
        if type_:
            call["type"] = type_
        if not call.get("messageId"):
            call["messageId"] = new_message_id()
        call["receivedAt"] = self.received_iso
        ctx = call.get("context")
        if ctx is None:
            ctx = call["context"] = {}
        if self.context:
            for k, v in self.context.items():
                ctx.setdefault(k, v)
        if self.ip and "ip" not in ctx:
            ctx["ip"] = self.ip
        if self.integrations:
            integ = call.get("integrations")
            if integ is None:
                call["integrations"] = dict(self.integrations)
            else:
                for k, v in self.integrations.items():
                    integ.setdefault(k, v)
        if call.get("type") == "identify" and call.get("traits") is None:
            traits = ctx.get("traits")
            if isinstance(traits, dict):
                call["traits"] = dict(traits)
        sent_raw = call.get("sentAt")
        if sent_raw is None and self.sent_at is not None:
            sent_raw = call["sentAt"] = self.sent_at
        sent = None
        if sent_raw is not None:
            sent = self._sent(sent_raw)
            if sent is None:
                return Rejection("bad_field", "sentAt must be an ISO-8601 date-time", "sentAt")
        key = "timestamp"
        client_raw = call.get("timestamp")
        if client_raw is None:
            key = "originalTimestamp"
            client_raw = call.get("originalTimestamp")
        if client_raw is None:
            call["timestamp"] = self.received_iso
            return None
        client = parse_ms(client_raw)
        if client is None:
            return Rejection("bad_field", f"{key} must be an ISO-8601 date-time", key)
        if "originalTimestamp" not in call:
            call["originalTimestamp"] = client_raw
        call["timestamp"] = iso_ms(self.received_ms - (sent - client)) if sent is not None else client_raw
        return None


BOM = b"\xef\xbb\xbf"
#: what decoding hostile JSON may raise besides ValidationError
BAD_JSON = (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError)


def _why(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    if isinstance(e, UnicodeDecodeError):
        return "not UTF-8"
    return str(e)


class Ingest:
    """The rules of one config, built once and used for every request."""

    def __init__(self, cfg: Config, transforms: list[Transform]) -> None:
        self.cfg = cfg
        self.keys = KeyRing(cfg.sources)
        self.proxies = ProxyTrust(cfg.server.trusted_proxies)
        self.transforms = transforms
        self.max_event = int(cfg.server.max_event_bytes)
        self.max_batch = int(cfg.server.max_batch_bytes)

    def body_limit(self, kind: str) -> int:
        return self.max_batch if kind in BATCH_PATHS else self.max_event

    def prepare(self, kind: str, body: bytes, headers: Mapping[str, str], peer: str | None,
                now: datetime | None = None) -> Prepared:
        """Decode, authenticate, check and enrich the calls of one request.

        Raises RequestRejected for what costs the whole request; per-call
        problems come back as rejections beside the good rows."""
        header_key = key_from_header(headers.get("Authorization"))
        source = self.keys.source_for(header_key) if header_key else None
        if header_key and source is None:
            raise RequestRejected(401, Rejection("auth", "the write key is not valid", "Authorization"))
        is_batch = kind in BATCH_PATHS
        type_ = None if is_batch else PATH_TYPES[kind]
        if body[:3] == BOM:
            body = body[3:]
        envelope: Any
        items: list[Any]
        try:
            if is_batch:
                envelope = batch_decoder.decode(body)
                items = envelope.batch
                body_key = envelope.writeKey
            else:
                envelope = None
                single = call_decoder.decode(body)
                items = [single]
                body_key = single.get("writeKey")
        except msgspec.ValidationError as e:
            raise RequestRejected(400, Rejection("json", f"invalid request: {e}", _field_of(e))) from None
        except BAD_JSON as e:
            raise RequestRejected(400, Rejection("json", f"body is not valid JSON: {_why(e)}")) from None
        if source is None:
            source = self.keys.source_for(body_key) if isinstance(body_key, str) else None
            if source is None:
                msg = "the write key is not valid" if body_key else \
                    "a write key is required (Authorization: Basic or Bearer, or writeKey in the body)"
                raise RequestRejected(401, Rejection("auth", msg, "writeKey"))
        received_ms = round(now.timestamp() * 1000) if now else int(time.time() * 1000)
        peer_ip = self.proxies.client_ip(peer, headers.get("X-Forwarded-For")) if self.proxies.any else peer
        if envelope is not None:
            enricher = Enricher(received_ms, peer_ip, envelope.context, envelope.integrations, envelope.sentAt)
        else:
            enricher = Enricher(received_ms, peer_ip)
        rows: list[bytes] = []
        rejections: list[Rejection] = []
        dropped: list[str] = []
        transforms = self.transforms
        limit = self.max_event
        for i, item in enumerate(items):
            index = i if is_batch else None
            if is_batch:
                # Each call is measured as sent and decoded on its own: one
                # malformed call costs only itself.
                if len(item) > limit:
                    rejections.append(Rejection(
                        "size", f"call is {len(item)} bytes; the limit is {limit} (server.max_event_bytes)",
                        f"batch[{i}]", limit, i))
                    continue
                try:
                    call = call_decoder.decode(item)
                except (msgspec.ValidationError, *BAD_JSON) as e:
                    rejections.append(Rejection("json", f"a call must be a JSON object: {_why(e)}",
                                                f"batch[{i}]", None, i))
                    continue
            else:
                call = item
            problem = check_call(call, type_)
            if problem is not None:
                problem.index = index
                if is_batch:
                    problem.field = f"batch[{i}].{problem.field}" if problem.field else f"batch[{i}]"
                rejections.append(problem)
                continue
            problem = enricher.apply(call, type_)
            if problem is not None:
                problem.index = index
                if is_batch:
                    problem.field = f"batch[{i}].{problem.field}"
                rejections.append(problem)
                continue
            for t in transforms:
                call = t.apply(call)
                if call is None:
                    dropped.append(t.drop_reason)
                    break
            else:
                rows.append(encoder.encode(call))
        return Prepared(source, rows, rejections, dropped)


def _field_of(e: msgspec.ValidationError) -> str | None:
    msg = str(e)
    at = msg.rfind("at `$")
    if at < 0:
        return None
    path = msg[at + 5:].rstrip("`")
    return path.lstrip(".") or None
