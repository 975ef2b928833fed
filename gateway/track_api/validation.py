"""The Track API's own limits and checks (docs/track-api-coming-in.md, "What
is refused").

Track has no lax mode: every check here raises ``TrackError``, which the
routes answer with a 400 that names the field.  Sizes are UTF-8 bytes; where
"32kb" or "500kb" could mean 1000s or 1024s, the smaller reading is taken, so
whatever passes here also fits the ``customerio_track`` destination's limits.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import msgspec

from gateway.ingest.timestamps import iso_ms

MAX_ID_BYTES = 150  # a person's id, an object's id
MAX_ATTRIBUTE_NAME_BYTES = 150
MAX_ATTRIBUTE_VALUE_BYTES = 1000
MAX_ATTRIBUTES = 300  # per identify call, object or relationship
MAX_EVENT_NAME_BYTES = 100
MAX_EVENT_DATA_BYTES = 100_000
MAX_REQUEST_BYTES = 32_000  # a v1 request, /api/v2/entity, one operation of a batch
MAX_BATCH_BYTES = 500_000  # /api/v2/batch

#: Unix seconds of 0001-01-01 and 9999-12-31T23:59:59: what ISO-8601 can write
MIN_UNIX, MAX_UNIX = -62_135_596_800, 253_402_300_799

_encode = msgspec.json.Encoder().encode


class TrackError(Exception):
    """One Track request (or one operation of a batch) that is refused.

    ``code`` is also the metrics label; ``field`` is a dotted path into the
    request body (or ``path.<name>`` for a URL part)."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def json_len(value: Any) -> int:
    """Bytes of ``value`` as compact JSON, the way sizes are measured."""
    return len(_encode(value))


def obj(value: Any, where: str, *, required: bool = False) -> dict[str, Any]:
    """A JSON object, or {} when absent (null counts as absent)."""
    if value is None:
        if required:
            raise TrackError("missing_field", f"{where} is required", where)
        return {}
    if not isinstance(value, dict):
        raise TrackError("bad_field", f"{where} must be an object", where)
    return value


def only_keys(body: dict[str, Any], allowed: Iterable[str], where: str = "") -> None:
    """Refuse keys Track does not define here rather than drop them unseen."""
    allowed = set(allowed)
    for key in body:
        if key not in allowed:
            field = f"{where}.{key}" if where else key
            raise TrackError("unknown_field", f"{field} is not a field of this request "
                             f"(allowed: {', '.join(sorted(allowed))})", field)


def identifier(value: Any, where: str, *, limit: int | None = None) -> str:
    """An identifier value: a non-empty string (an integer is taken as its digits)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise TrackError("bad_field", f"{where} must be a string", where)
    if not value.strip():
        raise TrackError("missing_field", f"{where} may not be empty", where)
    if limit is not None and utf8_len(value) > limit:
        raise TrackError("limit", f"{where} is {utf8_len(value)} bytes; the limit is {limit}", where)
    return value


def attributes(value: Any, where: str) -> dict[str, Any]:
    """Attribute maps (people, objects, relationships): count, names and values."""
    attrs = obj(value, where)
    if len(attrs) > MAX_ATTRIBUTES:
        raise TrackError("limit", f"{where} has {len(attrs)} attributes; the limit is {MAX_ATTRIBUTES}", where)
    for name, v in attrs.items():
        if not name:
            raise TrackError("bad_field", f"{where} has an attribute with an empty name", where)
        if utf8_len(name) > MAX_ATTRIBUTE_NAME_BYTES:
            raise TrackError("limit", f"attribute name {name[:40]!r}... in {where} is {utf8_len(name)} bytes; "
                             f"the limit is {MAX_ATTRIBUTE_NAME_BYTES}", where)
        size = utf8_len(v) if isinstance(v, str) else json_len(v) if isinstance(v, (dict, list)) else 0
        if size > MAX_ATTRIBUTE_VALUE_BYTES:
            raise TrackError("limit", f"{where}.{name} is {size} bytes; an attribute value may have at most "
                             f"{MAX_ATTRIBUTE_VALUE_BYTES}", f"{where}.{name}")
    return attrs


def event_name(value: Any, where: str = "name", *, limited: bool = True) -> str:
    """An event (or page, screen) name; only event names have Track's 100-byte limit."""
    if value is None:
        raise TrackError("missing_field", f"{where} is required", where)
    if not isinstance(value, str):
        raise TrackError("bad_field", f"{where} must be a string", where)
    if not value.strip():
        raise TrackError("missing_field", f"{where} may not be empty", where)
    if limited and utf8_len(value) > MAX_EVENT_NAME_BYTES:
        raise TrackError("limit", f"{where} is {utf8_len(value)} bytes; an event name may have at most "
                         f"{MAX_EVENT_NAME_BYTES}", where)
    return value


def event_data(value: Any, where: str = "data") -> dict[str, Any]:
    data = obj(value, where)
    size = json_len(data)
    if size > MAX_EVENT_DATA_BYTES:
        raise TrackError("limit", f"{where} is {size} bytes; event data may have at most {MAX_EVENT_DATA_BYTES}",
                         where)
    return data


def unix_time(value: Any, where: str) -> str:
    """Track's Unix seconds as the ISO-8601 UTC time, with milliseconds and Z, Pipelines uses."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not math.isfinite(value)):
        raise TrackError("bad_field", f"{where} must be a Unix timestamp in seconds (a number)", where)
    if not MIN_UNIX <= value <= MAX_UNIX:
        raise TrackError("bad_field", f"{where} {value} is out of range for a Unix timestamp in seconds", where)
    ms = value * 1000 if isinstance(value, int) else math.floor(value * 1000)
    return iso_ms(int(ms))


def object_type_id(value: Any, where: str) -> str:
    """A stringified positive integer ("1", "2", ...); an integer is taken too."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.isascii() or not value.isdigit() or value[0] == "0":
        raise TrackError("bad_field", f"{where} must be a positive integer as a string, such as \"1\"", where)
    return value
