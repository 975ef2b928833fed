"""Track v2's limits, checked on each op before it is sent: a call over a
limit is dead-lettered with ``LIMIT_EXCEEDED``, never cut to fit
(docs/customerio-track-v2.md §6.1, whose rule ids L-1 to L-5 this file uses).
The op size (L-1) is checked by ``prepare`` on the encoded bytes, the event
name (L-4) while the op is built.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.api import MappingError

_encode = msgspec.json.Encoder().encode

MAX_OP_BYTES = 32_000  # L-1
MAX_BATCH_BYTES = 500_000  # docs/customerio-track-v2.md §6.2 B-2
MAX_OPS_HARD_CAP = 1000  # the largest max_ops_per_batch
MAX_ID_BYTES = 150  # L-2, L-3
MAX_EVENT_NAME_BYTES = 100  # L-4
MAX_ATTR_NAME_BYTES = 150  # L-5
MAX_ATTR_VALUE_BYTES = 1000  # L-5
MAX_ATTRS = 300  # L-5


def utf8_len(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


def check_len(v: Any, limit: int, what: str) -> None:
    """A string of at most ``limit`` UTF-8 bytes (cheap for short ASCII strings)."""
    if isinstance(v, str) and len(v) > limit // 4 and utf8_len(v) > limit:
        raise MappingError("LIMIT_EXCEEDED", f"{what} is {utf8_len(v)} bytes; the limit is {limit}")


def check_event_name(name: str) -> None:
    """L-4: an event name of at most 100 UTF-8 bytes."""
    if len(name) > MAX_EVENT_NAME_BYTES // 4 and utf8_len(name) > MAX_EVENT_NAME_BYTES:
        raise MappingError("LIMIT_EXCEEDED", f"the event name is {utf8_len(name)} bytes; "
                                             f"the limit is {MAX_EVENT_NAME_BYTES}")


def _check_attributes(attrs: Any, what: str) -> None:
    """L-5: at most 300 top-level keys, names ≤ 150 bytes, values ≤ 1000 bytes."""
    if not attrs:
        return
    if len(attrs) > MAX_ATTRS:
        raise MappingError("LIMIT_EXCEEDED", f"{what} has {len(attrs)} attributes; the limit is {MAX_ATTRS}")
    for name, value in attrs.items():
        check_len(name, MAX_ATTR_NAME_BYTES, f"{what} name {name[:40]!r}…")
        if isinstance(value, str):
            size = utf8_len(value)
        elif isinstance(value, (dict, list)):
            size = len(_encode(value))
        else:
            continue  # numbers, booleans and null are exempt
        if size > MAX_ATTR_VALUE_BYTES:
            raise MappingError("LIMIT_EXCEEDED",
                               f"{what}.{name} is {size} bytes; the limit is {MAX_ATTR_VALUE_BYTES}")


def check_limits(op: dict[str, Any]) -> None:
    """L-2, L-3, then L-5, in the order docs/customerio-track-v2.md §6.1 gives."""
    kind = op["type"]
    ids = op.get("identifiers") or {}
    if kind == "person":
        check_len(ids.get("id"), MAX_ID_BYTES, "identifiers.id")
    elif kind == "object":
        check_len(ids.get("object_id"), MAX_ID_BYTES, "identifiers.object_id")
    for side in ("primary", "secondary"):
        if side in op:
            check_len(op[side].get("id"), MAX_ID_BYTES, f"{side}.id")
    rels = op.get("cio_relationships") or ()
    for i, rel in enumerate(rels):
        rid = rel["identifiers"]
        check_len(rid.get("id"), MAX_ID_BYTES, f"cio_relationships[{i}].identifiers.id")
        check_len(rid.get("object_id"), MAX_ID_BYTES, f"cio_relationships[{i}].identifiers.object_id")
    if kind == "object" or op["action"] == "identify":
        _check_attributes(op.get("attributes"), "attributes")
    for i, rel in enumerate(rels):
        _check_attributes(rel.get("relationship_attributes"), f"cio_relationships[{i}].relationship_attributes")
