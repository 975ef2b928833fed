"""Dotted paths into a call (``context.traits.email``), for transforms."""

from __future__ import annotations

from typing import Any

_MISSING = object()


def split_path(path: str) -> tuple[str, ...]:
    """``"context.traits.email"`` -> ``("context", "traits", "email")``."""
    return tuple(path.split("."))


def get_path(obj: dict[str, Any], parts: tuple[str, ...], default: Any = None) -> Any:
    """The value at ``parts``, or ``default`` where the path does not lead to one."""
    for p in parts:
        if not isinstance(obj, dict):
            return default
        obj = obj.get(p, _MISSING)
        if obj is _MISSING:
            return default
    return obj


def parent_of(obj: dict[str, Any], parts: tuple[str, ...], create: bool = False) -> dict[str, Any] | None:
    """The mapping that holds the last part, made on the way when ``create``."""
    for p in parts[:-1]:
        nxt = obj.get(p)
        if not isinstance(nxt, dict):
            if not create:
                return None
            nxt = obj[p] = {}
        obj = nxt
    return obj
