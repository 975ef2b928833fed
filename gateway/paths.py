"""Dotted paths into a call (``context.traits.email``), for transforms."""

from __future__ import annotations

from typing import Any

_MISSING = object()


def split(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def get(obj: dict[str, Any], parts: tuple[str, ...], default: Any = None) -> Any:
    for p in parts:
        if not isinstance(obj, dict):
            return default
        obj = obj.get(p, _MISSING)
        if obj is _MISSING:
            return default
    return obj


def parent(obj: dict[str, Any], parts: tuple[str, ...], create: bool = False) -> dict[str, Any] | None:
    """The mapping that holds the last part, made on the way when ``create``."""
    for p in parts[:-1]:
        nxt = obj.get(p)
        if not isinstance(nxt, dict):
            if not create:
                return None
            nxt = obj[p] = {}
        obj = nxt
    return obj
