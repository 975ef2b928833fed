"""Reading a call's fields for Track v2: the conventions for absent values and
identifiers, person references, device tokens and platforms, and event ids.
Section numbers (docs/customerio-track-v2.md §1, §2.1, §4.7, §4.10) and rule
ids (C-3, E-4) are those of docs/customerio-track-v2.md.

Plain functions of the call; what the settings decide is passed in.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import msgspec

from gateway.api import MappingError
from plugins.customerio.timestamps import unix_ms

_encode = msgspec.json.Encoder().encode

# docs/customerio-track-v2.md §2.1 ID-3: re.ASCII keeps [a-z] with IGNORECASE to the
# 52 ASCII letters, as in JavaScript (Python would also match "K" U+212A).
_EMAIL = re.compile(
    r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]*[a-z0-9])?",
    re.I | re.ASCII)
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}", re.I | re.ASCII)  # docs/customerio-track-v2.md §4.10 E-3
_OBJECT_TYPE_ID = re.compile(r"[1-9][0-9]*")  # docs/customerio-track-v2.md §4.5
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

#: docs/customerio-track-v2.md §4.7: platform names as Customer.io knows them
PLATFORMS: dict[str, str] = {"ios": "ios", "ipados": "ios", "tvos": "ios", "watchos": "ios", "android": "android"}


# -- docs/customerio-track-v2.md §1 conventions ------------------------------------


def absent(v: Any) -> bool:
    """Missing, null or "" (docs/customerio-track-v2.md §1.1 C-1)."""
    return v is None or v == ""


def blank(v: Any) -> bool:
    """Names and emails also count as absent when only whitespace (docs/customerio-track-v2.md §1.1 C-2)."""
    return v is None or (isinstance(v, str) and not v.strip())


def obj(v: Any) -> dict[str, Any]:
    """``v`` when it is an object, else {}."""
    return v if isinstance(v, dict) else {}


def first(*values: Any) -> Any:
    """The first present value, or None: the rules' "first present of"."""
    for v in values:
        if not absent(v):
            return v
    return None


def id_str(v: Any, what: str, code: str = "INVALID_IDENTIFIER") -> str:
    """An identifier as a string: numbers become strings (2.0 → "2"); booleans,
    objects and arrays are errors (docs/customerio-track-v2.md §1.2 C-3)."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise MappingError(code, f"{what} must be a string or a number, not {type(v).__name__}")
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def ident(container: dict[str, Any], key: str, what: str | None = None) -> str | None:
    """A present identifier field as a string, or None (whitespace counts as present)."""
    v = container.get(key)
    return None if absent(v) else id_str(v, what or key)


def email(v: Any, what: str) -> str | None:
    """traits.email / context.traits.email: whitespace-only counts as absent."""
    return None if blank(v) else id_str(v, what)


def name(v: Any) -> str | None:
    """A non-blank string name, else None."""
    return v if isinstance(v, str) and v.strip() else None


def context(call: dict[str, Any], key: str) -> dict[str, Any]:
    """``context.<key>`` when it is an object, else {}."""
    return obj(obj(call.get("context")).get(key))


def context_email(call: dict[str, Any]) -> str | None:
    return email(context(call, "traits").get("email"), "context.traits.email")


def when(call: dict[str, Any]) -> Any:
    """``timestamp``, else ``originalTimestamp`` (docs/customerio-track-v2.md §5.1)."""
    return first(call.get("timestamp"), call.get("originalTimestamp"))


# -- docs/customerio-track-v2.md §2 identifiers ------------------------------------


def person_ref(s: str, detect_emails: bool) -> dict[str, str]:
    """One person reference as a one-key identifier object (docs/customerio-track-v2.md §2.1)."""
    if s.startswith("cio_") and len(s) > 4:
        return {"cio_id": s[4:]}
    if detect_emails and _EMAIL.fullmatch(s):
        return {"email": s}
    return {"id": s}


def object_type_id(*candidates: Any) -> str:
    """The first present candidate, stringified, default "1"; a positive integer
    (docs/customerio-track-v2.md §4.5)."""
    v = first(*candidates)
    if v is None:
        return "1"
    s = id_str(v, "object_type_id", "INVALID_OBJECT_TYPE_ID")
    if not _OBJECT_TYPE_ID.fullmatch(s):
        raise MappingError("INVALID_OBJECT_TYPE_ID", f"object_type_id must be a positive integer, got {s!r}")
    return s


# -- docs/customerio-track-v2.md §4.7 devices ---------------------------------------


def device(call: dict[str, Any]) -> tuple[str | None, Any]:
    """(token, raw platform), context.device first, then properties.device."""
    ctx_dev = context(call, "device")
    prop_dev = obj(obj(call.get("properties")).get("device"))
    token = first(ctx_dev.get("token"), prop_dev.get("token"))
    if isinstance(token, (int, float)) and not isinstance(token, bool):
        token = id_str(token, "device token")
    elif not isinstance(token, str):
        token = None  # a boolean or an object is no token (R8 then degrades to an event)
    return token, first(ctx_dev.get("type"), prop_dev.get("type"))


def require_token(token: str | None) -> str:
    if token is None:
        raise MappingError("MISSING_DEVICE_TOKEN", "context.device.token (or properties.device.token) is required")
    return token


def platform(raw: Any) -> str | None:
    return PLATFORMS.get(raw.lower()) if isinstance(raw, str) else None


# -- docs/customerio-track-v2.md §4.10 event ids ------------------------------------


def event_id(call: dict[str, Any], mode: str) -> str | None:
    """The op's ``id``: none, the raw messageId, or a ULID (docs/customerio-track-v2.md §4.10)."""
    mid = call.get("messageId")
    if absent(mid) or mode == "none":
        return None
    mid = mid if isinstance(mid, str) else _encode(mid).decode()
    if mode == "message_id":
        return mid
    if _ULID.fullmatch(mid):
        return mid.upper()
    return derive_ulid(mid, unix_ms(when(call)))


def derive_ulid(message_id: str, time_ms: int) -> str:
    """48 bits of time, then the first 80 bits of SHA-256(messageId), in Crockford
    base32 (docs/customerio-track-v2.md §4.10 E-4)."""
    rand80 = int.from_bytes(hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).digest()[:10], "big")
    value = (time_ms << 80) | rand80
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))
