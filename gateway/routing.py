"""Which destinations a call goes to: its ``integrations`` object first, as
Segment and Customer.io define it, then each destination's ``filter``.

Values that are not booleans are read as a user would mean them:

| value of ``All`` or of a destination's name | meaning           |
|----------------------------------------------|-------------------|
| ``true``, an object (options), any other value| enabled           |
| ``false``, ``0``, ``"false"``, ``"off"``, ``"no"`` | disabled     |
| ``null``                                     | as if the key were absent |

A destination's own entry wins over ``All``; ``All`` defaults to enabled.
"""

from __future__ import annotations

from typing import Any

from gateway.config import FilterConfig

_FALSE_STRINGS = frozenset({"false", "off", "no", "0"})


def enabled(value: Any) -> bool:
    """Whether an ``integrations`` value switches a destination on."""
    if value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE_STRINGS
    return True


class Route:
    """The routing rules of one destination, built once."""

    __slots__ = ("names", "types", "events", "exclude", "sources", "open")

    def __init__(self, names: list[str], flt: FilterConfig) -> None:
        self.names = tuple(dict.fromkeys(names))
        self.types = frozenset(flt.types) if flt.types is not None else None
        self.events = frozenset(flt.events) if flt.events is not None else None
        self.exclude = frozenset(flt.exclude_events)
        self.sources = frozenset(flt.sources) if flt.sources is not None else None
        #: no filter: only an integrations object can turn a call away
        self.open = self.types is None and self.events is None and not self.exclude and self.sources is None

    def refuse(self, call: dict[str, Any], source: str) -> str | None:
        """None when the call goes to this destination, else the reason it does not."""
        integ = call.get("integrations")
        if integ:
            for name in self.names:
                v = integ.get(name)
                if v is not None:
                    if not enabled(v):
                        return f"integrations.{name} is {v!r}"
                    break
            else:
                all_ = integ.get("All")
                if all_ is not None and not enabled(all_):
                    return f"integrations.All is {all_!r} and {self.names[0]!r} is not enabled by name"
        t = call.get("type")
        if self.types is not None and t not in self.types:
            return f"filter.types does not include {t!r}"
        if self.sources is not None and source not in self.sources:
            return f"filter.sources does not include {source!r}"
        if t == "track":
            ev = call.get("event")
            if self.events is not None and ev not in self.events:
                return f"filter.events does not include {ev!r}"
            if ev in self.exclude:
                return f"filter.exclude_events includes {ev!r}"
        return None
