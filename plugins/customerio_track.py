"""``customerio_track``: Pipelines calls mapped to Customer.io Track API v2 ops.

The mapping is customerio-track-v2.md, rule by rule; section numbers (§) in
this file are that document's.  One call becomes at most one op (§0.2), so an
error's ``batch_index`` names the call it belongs to (§5).  ``prepare`` runs
once per event and per retry: it builds plain dicts and encodes them once.

``CustomerioBatchDestination`` (the POST of a ``{"batch": [...]}`` body and
the reading of Customer.io's answer: per-item errors, bisection of a 400,
halving on 413, pausing on bad credentials) is shared with
``customerio_pipelines``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import re
import time
from decimal import Decimal
from typing import Annotated, Any, Callable, ClassVar, Literal

import aiohttp
import msgspec

from gateway.destination import (
    basic_auth,
    BODY_EXCERPT, DELIVERED, Destination, Failed, Limits, MappingError, Outcome, Paused, Retry,
    outcome_for_status,
)
from gateway.hookspecs import hookimpl

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

REGIONS: dict[str, str] = {"us": "https://track.customer.io", "eu": "https://track-eu.customer.io"}
BATCH_PATH = "/api/v2/batch"
METRICS_PATH = "/api/v1/metrics"  # Appendix B
BATCH_OVERHEAD = len(b'{"batch":[]}')  # §4.2 "Body size = len('{"batch":[]}') + ..."

# §4.1 limits
MAX_OP_BYTES = 32_000
MAX_BATCH_BYTES = 500_000
MAX_OPS_HARD_CAP = 1000
MAX_ID_BYTES = 150
MAX_EVENT_NAME_BYTES = 100
MAX_ATTR_NAME_BYTES = 150
MAX_ATTR_VALUE_BYTES = 1000
MAX_ATTRS = 300

# §1.1: the AJV full email regex.  re.ASCII keeps [a-z] with IGNORECASE to the
# 52 ASCII letters, as in JavaScript (Python would also match "K" U+212A).
_EMAIL = re.compile(
    r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]*[a-z0-9])?",
    re.I | re.ASCII)
# §3.3 strict ISO-8601 (used with fullmatch; ASCII digits only)
_ISO = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?(Z|([+-])(\d{2}):?(\d{2}))?)?",
    re.ASCII)
_DIGITS = re.compile(r"\d+(?:\.\d+)?", re.ASCII)  # §3.1 "^\d+(\.\d+)?$"
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}", re.I | re.ASCII)  # §2.10
_OBJECT_TYPE_ID = re.compile(r"[1-9][0-9]*")  # §2.6
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

#: §2.8 platform normalisation
PLATFORMS: dict[str, str] = {"ios": "ios", "ipados": "ios", "tvos": "ios", "watchos": "ios", "android": "android"}
#: §2.9 R16: delivery metrics Track v2 can carry (CIO-TRACK delivery_operations)
V2_DELIVERY_METRICS = frozenset({"delivered", "opened", "converted"})
#: Appendix B: the v1 /api/v1/metrics enum
V1_DELIVERY_METRICS = frozenset({"bounced", "clicked", "converted", "deferred", "delivered", "dropped", "opened",
                                 "spammed"})
#: §2.2 step (2): traits that never become person attributes
_IDENTIFY_RESERVED = frozenset({"createdAt", "created_at", "object_type_id", "objectTypeId", "relationshipAttributes"})
#: §2.6 step (1), plus ``relationship_traits`` (see _group)
_GROUP_RESERVED = frozenset({"object_type_id", "objectTypeId", "relationshipAttributes", "relationship_traits",
                             "objectAttributes", "created_at", "createdAt"})

#: what a v1 metrics payload starts with; every v2 op starts with '{"type":'
_V1_PREFIX = b'{"delivery_id":'
_MERGE_PREFIX = b'{"type":"person","action":"merge",'
_IDENTIFY_PREFIX = b'{"type":"person","action":"identify",'


# -- §0.2 conventions and §1 identifiers ----------------------------------------


def _absent(v: Any) -> bool:
    """§0.2: missing, null or ""."""
    return v is None or v == ""


def _blank(v: Any) -> bool:
    """§0.2: names and emails also count as absent when only whitespace."""
    return v is None or (isinstance(v, str) and not v.strip())


def _obj(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _first(*values: Any) -> Any:
    """The first present value (§0.2), or None: the spec's ``a ?? b``."""
    for v in values:
        if not _absent(v):
            return v
    return None


def _id_str(v: Any, what: str, code: str = "INVALID_IDENTIFIER") -> str:
    """§0.2 ``str(x)``: numbers become strings (2.0 → "2"); booleans, objects and arrays are errors."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise MappingError(code, f"{what} must be a string or a number, not {type(v).__name__}")
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _ident(container: dict[str, Any], key: str, what: str | None = None) -> str | None:
    """A present identifier field as a string, or None (whitespace counts as present)."""
    v = container.get(key)
    return None if _absent(v) else _id_str(v, what or key)


def _email(v: Any, what: str) -> str | None:
    """traits.email / context.traits.email: whitespace-only counts as absent (§0.2)."""
    return None if _blank(v) else _id_str(v, what)


def _object_type_id(*candidates: Any) -> str:
    """§2.6: the first present candidate, stringified, default "1"; a positive integer."""
    v = _first(*candidates)
    if v is None:
        return "1"
    s = _id_str(v, "object_type_id", "INVALID_OBJECT_TYPE_ID")
    if not _OBJECT_TYPE_ID.fullmatch(s):
        raise MappingError("INVALID_OBJECT_TYPE_ID", f"object_type_id must be a positive integer, got {s!r}")
    return s


def _context(call: dict[str, Any], key: str) -> dict[str, Any]:
    """``context.<key>`` when it is an object, else {}."""
    return _obj(_obj(call.get("context")).get(key))


def _context_email(call: dict[str, Any]) -> str | None:
    return _email(_context(call, "traits").get("email"), "context.traits.email")


def _when(call: dict[str, Any]) -> Any:
    """§3.1: ``timestamp ?? originalTimestamp``."""
    return _first(call.get("timestamp"), call.get("originalTimestamp"))


# -- §3 timestamps ------------------------------------------------------------------


def parse_iso(s: str) -> tuple[int, str] | None:
    """§3.3: whole Unix seconds (floored) and the fraction's digits, or None."""
    m = _ISO.fullmatch(s)
    if m is None:
        return None
    y, mo, d, hh, mi, ss, frac, _, sign, oh, om = m.groups()
    year, month, day = int(y), int(mo), int(d)
    if not 1 <= month <= 12:
        return None
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    if not 1 <= day <= _DAYS_IN_MONTH[month - 1] + (month == 2 and leap):
        return None
    hour, minute, second = int(hh or 0), int(mi or 0), int(ss or 0)
    if hour > 23 or minute > 59 or second > 59:
        return None
    offset = 0
    if sign:
        if int(oh) > 23 or int(om) > 59:
            return None
        offset = (int(oh) * 3600 + int(om) * 60) * (1 if sign == "+" else -1)
    # days from 1970-01-01 in the proleptic Gregorian calendar (Hinnant's days_from_civil)
    y2 = year - (month <= 2)
    era = y2 // 400
    yoe = y2 - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    return days * 86400 + hour * 3600 + minute * 60 + second - offset, frac or ""


def _maybe_iso(v: str) -> int | None:
    """§3.2: a strict ISO string's floored seconds; a cheap look first (this runs per attribute)."""
    if len(v) < 10 or v[4] != "-":
        return None
    p = parse_iso(v)
    return None if p is None else p[0]


def to_unix(v: Any) -> int | None:
    """§3.1: a top-level timestamp as integer Unix seconds, or None to omit the key."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return math.floor(v) if math.isfinite(v) else None
    if isinstance(v, str):
        if _DIGITS.fullmatch(v):
            return int(v.partition(".")[0])
        p = parse_iso(v)
        return None if p is None else p[0]
    return None


def _time_ms(v: Any) -> int:
    """§2.10: the event time in Unix milliseconds, floored; 0 when absent, unparseable or
    negative, and 0 past the 48 bits a ULID's time has (a gateway decision)."""
    ms = 0
    if isinstance(v, bool) or v is None:
        return 0
    if isinstance(v, int):
        ms = v * 1000
    elif isinstance(v, float):
        ms = math.floor(Decimal(repr(v)) * 1000) if math.isfinite(v) else 0
    elif isinstance(v, str):
        if _DIGITS.fullmatch(v):
            ms = math.floor(Decimal(v) * 1000)
        elif (p := parse_iso(v)) is not None:
            ms = p[0] * 1000 + int(p[1][:3].ljust(3, "0"))
    return ms if 0 <= ms < 1 << 48 else 0


def derive_ulid(message_id: str, time_ms: int) -> str:
    """§2.10: 48 bits of time, then the first 80 bits of SHA-256(messageId), in Crockford base32."""
    rand80 = int.from_bytes(hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).digest()[:10], "big")
    value = (time_ms << 80) | rand80
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def convert(obj: dict[str, Any]) -> dict[str, Any]:
    """§3.2: a copy with strict-ISO strings as Unix seconds, entering objects but not arrays."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, str):
            sec = _maybe_iso(v)
            out[k] = v if sec is None else sec
        elif isinstance(v, dict):
            out[k] = convert(v)
        else:
            out[k] = v
    return out


# -- §4.1 limits ------------------------------------------------------------------


def _utf8_len(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


def _check_len(v: Any, limit: int, what: str) -> None:
    if isinstance(v, str) and len(v) > limit // 4 and _utf8_len(v) > limit:
        raise MappingError("LIMIT_EXCEEDED", f"{what} is {_utf8_len(v)} bytes; the limit is {limit}")


def _check_attributes(attrs: Any, what: str) -> None:
    """§4.1: at most 300 top-level keys, names ≤ 150 bytes, values ≤ 1000 bytes."""
    if not attrs:
        return
    if len(attrs) > MAX_ATTRS:
        raise MappingError("LIMIT_EXCEEDED", f"{what} has {len(attrs)} attributes; the limit is {MAX_ATTRS}")
    for name, value in attrs.items():
        _check_len(name, MAX_ATTR_NAME_BYTES, f"{what} name {name[:40]!r}…")
        if isinstance(value, str):
            size = _utf8_len(value)
        elif isinstance(value, (dict, list)):
            size = len(_encode(value))
        else:
            continue  # numbers, booleans and null are exempt
        if size > MAX_ATTR_VALUE_BYTES:
            raise MappingError("LIMIT_EXCEEDED",
                               f"{what}.{name} is {size} bytes; the limit is {MAX_ATTR_VALUE_BYTES}")


def check_limits(op: dict[str, Any]) -> None:
    """§4.1, in its order: identifier lengths, then attributes.  The event-name
    length is checked while building and the op size by ``prepare``."""
    kind = op["type"]
    ids = op.get("identifiers") or {}
    if kind == "person":
        _check_len(ids.get("id"), MAX_ID_BYTES, "identifiers.id")
    elif kind == "object":
        _check_len(ids.get("object_id"), MAX_ID_BYTES, "identifiers.object_id")
    for side in ("primary", "secondary"):
        if side in op:
            _check_len(op[side].get("id"), MAX_ID_BYTES, f"{side}.id")
    rels = op.get("cio_relationships") or ()
    for i, rel in enumerate(rels):
        rid = rel["identifiers"]
        _check_len(rid.get("id"), MAX_ID_BYTES, f"cio_relationships[{i}].identifiers.id")
        _check_len(rid.get("object_id"), MAX_ID_BYTES, f"cio_relationships[{i}].identifiers.object_id")
    if kind == "object" or op["action"] == "identify":
        _check_attributes(op.get("attributes"), "attributes")
    for i, rel in enumerate(rels):
        _check_attributes(rel.get("relationship_attributes"), f"cio_relationships[{i}].relationship_attributes")


# -- sending: shared with customerio_pipelines -----------------------------------


def check_region(region: str) -> str:
    """``us`` or ``eu`` in any case: the regions both Customer.io APIs have."""
    normal = region.strip().lower()
    if normal not in ("us", "eu"):
        raise ValueError(f"region must be us or eu, got {region!r}")
    return normal


class CustomerioBatchDestination(Destination):
    """POSTs ``{"batch": [...]}`` and reads Customer.io's answer per item (§5.1).

    Subclasses set ``batch_url`` and ``headers`` (with Authorization) in ``__init__``."""

    batch_url: str
    headers: dict[str, str]
    #: statuses that mean "fix the settings": nothing can get through (§5.1 401/403/404)
    pause_statuses: ClassVar[frozenset[int]] = frozenset({401, 403, 404})

    def batch_body(self, payloads: list[bytes]) -> bytes:
        return b'{"batch":[' + b",".join(payloads) + b"]}"

    def pause_for(self, status: int, text: str) -> Paused | None:
        """The Paused to raise for this answer, or None."""
        if status in self.pause_statuses:
            hint = "check the API credentials" if status != 404 else "check region and endpoint"
            return Paused(f"HTTP {status}: {hint}", status, text[:BODY_EXCERPT])
        return None

    async def post_batch(self, payloads: list[bytes], turns: "Turns | None" = None) -> list[Outcome]:
        """One request, split further when Customer.io refuses it whole:
        a 400 is bisected to find the bad calls, a 413 halved (§5.1)."""
        assert self.http is not None, "the engine sets the HTTP session before sending"
        turns = turns or Turns(self)
        await turns.take()
        async with self.http.post(self.batch_url, data=self.batch_body(payloads), headers=self.headers) as resp:
            status = resp.status
            text = await resp.text(errors="replace")
            whole = outcome_for_status(status, text, resp.headers)
        n = len(payloads)
        if 200 <= status < 300:
            return item_outcomes(status, text, n)
        paused = self.pause_for(status, text)
        if paused is not None:
            raise paused
        if status in (400, 413) and n > 1:
            if status == 400:
                log.warning("%s: HTTP 400 for a batch of %d calls; bisecting to find the bad ones "
                            "(a mapping bug if it is ours): %s", self.name, n, text[:200])
            mid = n // 2
            return await self.post_batch(payloads[:mid], turns) + await self.post_batch(payloads[mid:], turns)
        if status == 413:
            return [Failed(f"LIMIT_EXCEEDED: HTTP 413 for a single call of {len(payloads[0])} bytes",
                           status, text[:BODY_EXCERPT])]
        return [whole] * n


class Turns:
    """The rate limit inside one ``send``: the engine paid for its first
    request; every further one (a split, a bisection) waits its turn."""

    def __init__(self, dest: Destination) -> None:
        self.dest = dest
        self.first = True

    async def take(self) -> None:
        if self.first:
            self.first = False
        else:
            await self.dest.throttle()


def item_outcomes(status: int, text: str, n: int) -> list[Outcome]:
    """§5.1 200/207: every op is delivered except those a valid ``batch_index``
    names in ``errors``, which are permanent failures; other errors are logged."""
    outcomes: list[Outcome] = [DELIVERED] * n
    try:
        doc = _decode(text) if text.strip() else None
    except msgspec.DecodeError:
        doc = None
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not errors or not isinstance(errors, list):
        return outcomes
    for err in errors:
        i = err.get("batch_index") if isinstance(err, dict) else None
        if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n:
            message = err.get("message") or err.get("reason") or "rejected"
            field = err.get("field")
            reason = f"HTTP {status}: {message}" + (f" (field: {field})" if field else "")
            outcomes[i] = Failed(reason, status, _encode(err).decode()[:BODY_EXCERPT])
        else:
            log.warning("HTTP %d: an error without a valid batch_index (%d ops): %r", status, n, err)
    return outcomes


# -- the destination -------------------------------------------------------------


#: builds the op of one call; a semantic mapper may return None for "map as R2"
Mapper = Callable[["CustomerioTrackDestination", dict[str, Any]], "dict[str, Any] | None"]


class CustomerioTrackDestination(CustomerioBatchDestination):
    """Customer.io Track API v2, ``POST /api/v2/batch`` with Basic SITE_ID:API_KEY."""

    type = "customerio_track"
    limits = Limits(max_batch_calls=100, max_batch_bytes=MAX_BATCH_BYTES, max_call_bytes=MAX_OP_BYTES,
                    batch_overhead=BATCH_OVERHEAD, rate_requests=1000.0, rate_period=1.0)

    class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        #: Workspace Settings > API Credentials; an all-digit value may come from YAML as a number
        site_id: str | int
        api_key: str | int
        region: str = "us"
        #: overrides the region's base URL (tests, proxies)
        endpoint: str | None = None
        convert_timestamps: bool = True
        detect_email_user_ids: bool = True
        event_id_mode: Literal["ulid", "message_id", "none"] = "ulid"
        max_ops_per_batch: Annotated[int, msgspec.Meta(ge=1, le=MAX_OPS_HARD_CAP)] = 100
        #: Appendix B: delivery metrics v2 cannot carry go to /api/v1/metrics
        delivery_v1_fallback: bool = False

        def __post_init__(self) -> None:
            self.site_id, self.api_key = str(self.site_id), str(self.api_key)
            if not self.site_id or not self.api_key:
                raise ValueError("site_id and api_key are required (Workspace Settings > API Credentials)")
            self.region = check_region(self.region)

    def __init__(self, name: str, settings: Settings, http: aiohttp.ClientSession | None) -> None:
        super().__init__(name, settings, http)
        base = (settings.endpoint or REGIONS[settings.region]).rstrip("/")
        self.batch_url = base + BATCH_PATH
        self.metrics_url = base + METRICS_PATH
        self.headers = {"Content-Type": "application/json",
                        "Authorization": basic_auth(str(settings.site_id), str(settings.api_key))}
        # the engine reads the instance's limits (gateway/destination.py declares a ClassVar)
        self.limits = msgspec.structs.replace(
            type(self).limits, max_batch_calls=settings.max_ops_per_batch)
        self.convert_timestamps = settings.convert_timestamps
        self.detect_emails = settings.detect_email_user_ids
        self.event_id_mode = settings.event_id_mode

    # -- prepare ------------------------------------------------------------------

    def prepare(self, call: dict[str, Any]) -> bytes:
        """One call → one Track v2 op (§2), checked against §4.1 and encoded compactly."""
        t = call.get("type")
        mapper = _TYPES.get(t) if isinstance(t, str) else None
        if mapper is None:
            raise MappingError("UNSUPPORTED_EVENT_TYPE", f"type {t!r} has no Track v2 op (R18)")
        op = mapper(self, call)
        assert op is not None  # only semantic mappers return None, and _track handles that
        if "delivery_id" not in op:
            check_limits(op)
        data = _encode(op)
        if len(data) > MAX_OP_BYTES:
            raise MappingError("LIMIT_EXCEEDED", f"the op is {len(data)} bytes; the limit is {MAX_OP_BYTES}")
        return data

    def person_ref(self, s: str) -> dict[str, str]:
        """§1.1."""
        if s.startswith("cio_") and len(s) > 4:
            return {"cio_id": s[4:]}
        if self.detect_emails and _EMAIL.fullmatch(s):
            return {"email": s}
        return {"id": s}

    def _user(self, call: dict[str, Any]) -> dict[str, str]:
        """§1.2 semantic person ops: person_ref(userId) only."""
        uid = _ident(call, "userId")
        if uid is None:
            raise MappingError("MISSING_IDENTIFIER", f"{call.get('event') or call.get('type')} requires userId")
        return self.person_ref(uid)

    def _convert(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """§3.2 when ``convert_timestamps`` is on."""
        return convert(attrs) if self.convert_timestamps else attrs

    def _attributes(self, attrs: dict[str, Any], anonymous_id: str | None) -> dict[str, Any]:
        """§1.3 then §3.2: ``anonymous_id`` wins over the same key in traits or properties."""
        if anonymous_id is not None:
            attrs["anonymous_id"] = anonymous_id
        return self._convert(attrs)

    def _event_id(self, call: dict[str, Any]) -> str | None:
        """§2.10."""
        mid = call.get("messageId")
        if _absent(mid) or self.event_id_mode == "none":
            return None
        mid = mid if isinstance(mid, str) else _encode(mid).decode()
        if self.event_id_mode == "message_id":
            return mid
        if _ULID.fullmatch(mid):
            return mid.upper()
        return derive_ulid(mid, _time_ms(_when(call)))

    def _identify(self, call: dict[str, Any]) -> dict[str, Any]:
        """R1, §2.2."""
        traits = _obj(call.get("traits"))
        uid = _ident(call, "userId")
        if uid is not None:
            identifiers = self.person_ref(uid)
        elif (email := _email(traits.get("email"), "traits.email") or _context_email(call)) is not None:
            identifiers = {"email": email}
        else:
            raise MappingError("MISSING_IDENTIFIER", "identify requires userId or traits.email; anonymousId "
                                                     "alone cannot identify a person in Track v2")
        relationship = None
        object_id = _ident(traits, "objectId", "traits.objectId")
        if object_id is not None:
            rel_ids = {"object_type_id": _object_type_id(traits.get("object_type_id"), traits.get("objectTypeId")),
                       "object_id": object_id}
            relationship = {"identifiers": rel_ids}
            rel_attrs = traits.get("relationshipAttributes")
            if isinstance(rel_attrs, dict) and rel_attrs:
                relationship["relationship_attributes"] = self._convert(rel_attrs)
        attrs = {k: v for k, v in traits.items() if k not in _IDENTIFY_RESERVED}
        created = _first(traits.get("created_at"), traits.get("createdAt"))
        if created is not None:
            attrs["created_at"] = created
        attrs = self._attributes(attrs, _ident(call, "anonymousId"))
        op: dict[str, Any] = {"type": "person", "action": "identify", "identifiers": identifiers}
        ts = to_unix(_when(call))
        if ts is not None:
            op["timestamp"] = ts
        if attrs:
            op["attributes"] = attrs
        if relationship is not None:
            op["cio_relationships"] = [relationship]
        return op

    def _person_activity(self, call: dict[str, Any], action: str, name: str | None) -> dict[str, Any]:
        """R2-R4 (§2.3-§2.5): person event, page or screen.  ``name`` None means page/screen
        resolution, which comes after the identifiers."""
        uid = _ident(call, "userId")
        anon = _ident(call, "anonymousId")
        if uid is not None:
            identifiers = self.person_ref(uid)
        elif anon is not None:
            identifiers = {"anonymous_id": anon}
        elif (email := _context_email(call)) is not None:
            identifiers = {"email": email}
        else:
            raise MappingError("MISSING_IDENTIFIER", f"{action} requires userId, anonymousId or "
                                                     "context.traits.email")
        props = _obj(call.get("properties"))
        if action == "event":
            assert name is not None
            if len(name) > MAX_EVENT_NAME_BYTES // 4 and _utf8_len(name) > MAX_EVENT_NAME_BYTES:
                raise MappingError("LIMIT_EXCEEDED", f"the event name is {_utf8_len(name)} bytes; "
                                                     f"the limit is {MAX_EVENT_NAME_BYTES}")
        elif action == "page":
            name = _name(props.get("url")) or _name(call.get("name"))
            if name is None:
                raise MappingError("MISSING_PAGE_NAME", "page requires properties.url or name")
        else:
            name = _name(call.get("name")) or _name(props.get("name"))
            if name is None:
                raise MappingError("MISSING_SCREEN_NAME", "screen requires name or properties.name")
        op: dict[str, Any] = {"type": "person", "action": action, "identifiers": identifiers, "name": name}
        event_id = self._event_id(call)
        if event_id is not None:
            op["id"] = event_id
        ts = to_unix(_when(call))
        if ts is not None:
            op["timestamp"] = ts
        attrs = self._attributes(dict(props), anon if "anonymous_id" not in identifiers else None)
        if attrs:
            op["attributes"] = attrs
        return op

    def _page(self, call: dict[str, Any]) -> dict[str, Any]:
        return self._person_activity(call, "page", None)

    def _screen(self, call: dict[str, Any]) -> dict[str, Any]:
        return self._person_activity(call, "screen", None)

    def _track(self, call: dict[str, Any]) -> dict[str, Any]:
        """§2.1: a semantic event by its exact name (R7-R17), else R2."""
        event = _name(call.get("event"))
        if event is None:
            raise MappingError("MISSING_EVENT_NAME", "track requires an event name")
        semantic = _SEMANTIC.get(event)
        if semantic is not None:
            op = semantic(self, call)
            if op is not None:
                return op
        return self._person_activity(call, "event", event)

    def _group(self, call: dict[str, Any]) -> dict[str, Any]:
        """R5, §2.6.  ``traits.relationship_traits`` is read when ``relationshipAttributes``
        is absent: seeds/pipelines-vs-track-api.txt (Managing objects) documents it as the
        Pipelines group's relationship object, and the seed wins (DESIGN.md)."""
        object_id = _ident(call, "groupId")
        if object_id is None:
            raise MappingError("MISSING_GROUP_ID", "group requires groupId")
        traits = _obj(call.get("traits"))
        ids = {"object_type_id": _object_type_id(traits.get("object_type_id"), traits.get("objectTypeId"),
                                                 call.get("objectTypeId")),
               "object_id": object_id}
        uid = _ident(call, "userId")
        anon = _ident(call, "anonymousId")
        attrs = {k: v for k, v in traits.items() if k not in _GROUP_RESERVED}
        created = _first(traits.get("created_at"), traits.get("createdAt"))
        if created is not None:
            attrs["created_at"] = created
        obj_attrs = traits.get("objectAttributes")
        if isinstance(obj_attrs, dict):
            attrs.update(obj_attrs)
        op: dict[str, Any] = {"type": "object", "action": "identify_anonymous" if uid is None and anon is not None
                              else "identify", "identifiers": ids}
        attrs = self._convert(attrs)
        if attrs:
            op["attributes"] = attrs
        if uid is not None or anon is not None:
            rel: dict[str, Any] = {"identifiers": self.person_ref(uid) if uid is not None
                                   else {"anonymous_id": anon}}
            rel_attrs = traits.get("relationshipAttributes")
            if rel_attrs is None:
                rel_attrs = traits.get("relationship_traits")
            if isinstance(rel_attrs, dict) and rel_attrs:
                rel["relationship_attributes"] = self._convert(rel_attrs)
            op["cio_relationships"] = [rel]
        return op

    def _alias(self, call: dict[str, Any]) -> dict[str, Any]:
        """R6, §2.7: no root ``identifiers``."""
        uid = _ident(call, "userId")
        prev = _ident(call, "previousId")
        if uid is None or prev is None:
            raise MappingError("MISSING_MERGE_IDENTIFIER", "alias requires both userId and previousId")
        return {"type": "person", "action": "merge", "primary": self.person_ref(uid),
                "secondary": self.person_ref(prev)}

    # -- semantic events (R7-R17) ---------------------------------------------------

    def _add_device(self, call: dict[str, Any]) -> dict[str, Any]:
        """R7, §2.8: errors in the order MISSING_IDENTIFIER, MISSING_DEVICE_TOKEN, INVALID_DEVICE_PLATFORM."""
        identifiers = self._user(call)
        maybe_token, platform_raw = _device(call)
        token = _require_token(maybe_token)
        platform = _platform(platform_raw)
        if platform is None:
            raise MappingError("INVALID_DEVICE_PLATFORM", f"device type {platform_raw!r} is not ios or android")
        return self._device_op(call, identifiers, token, platform)

    def _device_op(self, call: dict[str, Any], identifiers: dict[str, str], token: str,
                   platform: str) -> dict[str, Any]:
        device: dict[str, Any] = {"token": token, "platform": platform}
        last_used = to_unix(_when(call))
        if last_used is not None:
            device["last_used"] = last_used
        # §2.8: no timestamp conversion in device attributes (§7 D-16)
        attrs = {k: v for k, v in _obj(call.get("properties")).items() if k != "device"}
        version = _context(call, "app").get("version")
        if not _absent(version):
            attrs["app_version"] = version
        if attrs:
            device["attributes"] = attrs
        return {"type": "person", "action": "add_device", "identifiers": identifiers, "device": device}

    def _application_device(self, call: dict[str, Any]) -> dict[str, Any] | None:
        """R8: add_device only with userId, token and a valid platform; else the R2 event (§7 D-17)."""
        uid = _ident(call, "userId")
        token, platform_raw = _device(call)
        platform = _platform(platform_raw)
        if uid is None or token is None or platform is None:
            return None
        return self._device_op(call, self.person_ref(uid), token, platform)

    def _delete_device(self, call: dict[str, Any]) -> dict[str, Any]:
        """R9, R10."""
        identifiers = self._user(call)
        token, _ = _device(call)
        return {"type": "person", "action": "delete_device", "identifiers": identifiers,
                "device": {"token": _require_token(token)}}

    def _object_ids(self, call: dict[str, Any]) -> dict[str, str]:
        """§1.2: the object of Relationship Deleted and Object Deleted."""
        props = _obj(call.get("properties"))
        object_id = _ident(props, "objectId", "properties.objectId")
        if object_id is None:
            raise MappingError("MISSING_OBJECT_ID", "properties.objectId is required")
        return {"object_type_id": _object_type_id(props.get("object_type_id"), props.get("objectTypeId")),
                "object_id": object_id}

    def _relationship_deleted(self, call: dict[str, Any]) -> dict[str, Any]:
        """R14: MISSING_OBJECT_ID before MISSING_IDENTIFIER."""
        ids = self._object_ids(call)
        return {"type": "object", "action": "delete_relationships", "identifiers": ids,
                "cio_relationships": [{"identifiers": self._user(call)}]}

    def _object_deleted(self, call: dict[str, Any]) -> dict[str, Any]:
        """R15: anonymousId is not needed (as in SEG)."""
        return {"type": "object", "action": "delete", "identifiers": self._object_ids(call)}

    def _delivery(self, call: dict[str, Any]) -> dict[str, Any]:
        """R16, §2.9; Appendix B when ``delivery_v1_fallback`` is on."""
        props = _obj(call.get("properties"))
        delivery_id, metric = props.get("deliveryId"), props.get("metric")
        if _absent(delivery_id) or _absent(metric):
            raise MappingError("MISSING_DELIVERY_FIELDS", "properties.deliveryId and properties.metric are required")
        delivery_id = _id_str(delivery_id, "properties.deliveryId")
        token = _first(props.get("recipient"), _context(call, "device").get("token"))
        if not isinstance(metric, str):
            raise MappingError("UNSUPPORTED_IN_TRACK_V2", f"delivery metric {metric!r} is not a name")
        if metric in V2_DELIVERY_METRICS and token is not None:
            return {"type": "delivery", "action": "event", "identifiers": {"id": delivery_id}, "name": metric,
                    "attributes": {"device_token": token}}
        if self.settings.delivery_v1_fallback and metric in V1_DELIVERY_METRICS:
            return _v1_metric(call, props, delivery_id, metric)
        if metric not in V2_DELIVERY_METRICS:
            raise MappingError("UNSUPPORTED_IN_TRACK_V2", f"delivery metric {metric!r} has no Track v2 op "
                                                          "(delivered, opened, converted)")
        raise MappingError("MISSING_DEVICE_TOKEN", "properties.recipient or context.device.token is required")

    def _unsupported(self, call: dict[str, Any]) -> dict[str, Any]:
        """R17."""
        raise MappingError("UNSUPPORTED_IN_TRACK_V2", f"{call.get('event')!r} has no documented Track v2 op")

    # -- send ---------------------------------------------------------------------

    async def send(self, payloads: list[bytes]) -> list[Outcome]:
        """§4.2 and §5: v2 ops in as few requests as the merge rule allows, in order;
        Appendix B metrics one request each."""
        outcomes: list[Outcome] = [DELIVERED] * len(payloads)
        v2 = [i for i, p in enumerate(payloads) if not p.startswith(_V1_PREFIX)]
        held: Retry | None = None
        turns = Turns(self)
        for part in _merge_safe_parts(payloads, v2):
            if held is not None:  # an earlier part failed: keep the order, send nothing after it
                for i in part:
                    outcomes[i] = held
                continue
            results = await self.post_batch([payloads[i] for i in part], turns)
            for i, oc in zip(part, results):
                outcomes[i] = oc
            failed = next((oc for oc in results if isinstance(oc, Retry)), None)
            if failed is not None:
                held = Retry(f"held back behind a failed request: {failed.reason}", failed.status, failed.body,
                             failed.retry_after)
        for i, p in enumerate(payloads):
            if p.startswith(_V1_PREFIX):
                outcomes[i] = await self._post_metric(p, turns)
        return outcomes

    async def _post_metric(self, payload: bytes, turns: Turns) -> Outcome:
        """Appendix B: one unbatched request, classified as §5.1 without batch_index."""
        assert self.http is not None
        await turns.take()
        async with self.http.post(self.metrics_url, data=payload, headers=self.headers) as resp:
            text = await resp.text(errors="replace")
            outcome = outcome_for_status(resp.status, text, resp.headers)
        paused = self.pause_for(resp.status, text)
        if paused is not None:
            raise paused
        if resp.status == 413:
            return Failed("LIMIT_EXCEEDED: HTTP 413", 413, text[:BODY_EXCERPT])
        return outcome


def _name(v: Any) -> str | None:
    """A non-blank string name, else None (§0.2)."""
    return v if isinstance(v, str) and v.strip() else None


def _device(call: dict[str, Any]) -> tuple[str | None, Any]:
    """§2.8: (token, raw platform), context.device first, then properties.device."""
    ctx_dev = _context(call, "device")
    prop_dev = _obj(_obj(call.get("properties")).get("device"))
    token = _first(ctx_dev.get("token"), prop_dev.get("token"))
    if isinstance(token, (int, float)) and not isinstance(token, bool):
        token = _id_str(token, "device token")
    elif not isinstance(token, str):
        token = None  # a boolean or an object is no token (R8 then degrades to an event)
    return token, _first(ctx_dev.get("type"), prop_dev.get("type"))


def _require_token(token: str | None) -> str:
    if token is None:
        raise MappingError("MISSING_DEVICE_TOKEN", "context.device.token (or properties.device.token) is required")
    return token


def _platform(raw: Any) -> str | None:
    return PLATFORMS.get(raw.lower()) if isinstance(raw, str) else None


def _v1_metric(call: dict[str, Any], props: dict[str, Any], delivery_id: str, metric: str) -> dict[str, Any]:
    """Appendix B body; ``delivery_id`` first, which is how ``send`` tells it from a v2 op."""
    ts = to_unix(_when(call))
    body: dict[str, Any] = {"delivery_id": delivery_id, "metric": metric,
                            "timestamp": ts if ts is not None else int(time.time())}
    for key in ("recipient", "reason", "href"):
        if not _absent(props.get(key)):
            body[key] = props[key]
    meta = {k: props[src] for k, src in (("action_name", "actionName"), ("action_value", "actionValue"))
            if not _absent(props.get(src))}
    if meta:
        body["metadata"] = meta
    return body


def _merge_safe_parts(payloads: list[bytes], indexes: list[int]) -> list[list[int]]:
    """§4.2: never a merge in the same request as an identify of its primary.
    Only batches holding a merge are decoded; a new request starts where needed."""
    if not any(payloads[i].startswith(_MERGE_PREFIX) for i in indexes):
        return [indexes] if indexes else []
    parts: list[list[int]] = []
    cur: list[int] = []
    identified: set[bytes] = set()  # identify identifiers in cur
    primaries: set[bytes] = set()  # merge primaries in cur
    for i in indexes:
        p = payloads[i]
        key: bytes | None = None
        if p.startswith(_MERGE_PREFIX):
            key = _encode(_decode(p)["primary"])
            clash = key in identified
        elif p.startswith(_IDENTIFY_PREFIX):
            key = _encode(_decode(p)["identifiers"])
            clash = key in primaries
        else:
            clash = False
        if clash:
            parts.append(cur)
            cur, identified, primaries = [], set(), set()
        cur.append(i)
        if key is not None:
            (primaries if p.startswith(_MERGE_PREFIX) else identified).add(key)
    if cur:
        parts.append(cur)
    return parts


def _person_op(action: str) -> Mapper:
    """R11-R13 (§2.9): an op that names the person and nothing else."""
    def build(dest: CustomerioTrackDestination, call: dict[str, Any]) -> dict[str, Any]:
        return {"type": "person", "action": action, "identifiers": dest._user(call)}
    return build


C = CustomerioTrackDestination
_TYPES: dict[str, Mapper] = {
    "identify": C._identify, "track": C._track, "page": C._page, "screen": C._screen,
    "group": C._group, "alias": C._alias,
}
#: §2.1 R7-R17, matched exactly (case-sensitive)
_SEMANTIC: dict[str, Mapper] = {
    "Device Created or Updated": C._add_device,
    "Application Installed": C._application_device,
    "Application Opened": C._application_device,
    "Device Deleted": C._delete_device,
    "Application Uninstalled": C._delete_device,
    "User Deleted": _person_op("delete"),
    "User Suppressed": _person_op("suppress"),
    "User Unsuppressed": _person_op("unsuppress"),
    "Relationship Deleted": C._relationship_deleted,
    "Object Deleted": C._object_deleted,
    "Report Delivery Event": C._delivery,
    "Report Content Event": C._unsupported,
}
del C


@hookimpl
def register_destinations() -> list[type[Destination]]:
    return [CustomerioTrackDestination]
