"""Built-in transforms: drop, allow/deny, rename, hash and set.

Each is a plugin type like a third party's; source-level ones run before the
spool, so a dropped field never touches disk.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from gateway.api import Transform, hookimpl, parent_of, split_path


class _Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class DropFields(Transform):
    """Remove fields (``context.ip``, ``traits.email``) from every call."""

    type = "drop_fields"

    class Settings(_Settings):
        paths: list[str]

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.parts = [split_path(p) for p in settings.paths]

    def apply(self, call: dict[str, Any]) -> dict[str, Any] | None:
        for parts in self.parts:
            holder = parent_of(call, parts)
            if holder is not None:
                holder.pop(parts[-1], None)
        return call


class _EventList(Transform):
    class Settings(_Settings):
        events: list[str]
        #: call types checked; other types pass.  Names are track events,
        #: page and screen names.
        types: list[str] = msgspec.field(default_factory=lambda: ["track"])

    keep_listed: bool

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.events = frozenset(settings.events)
        self.types = frozenset(settings.types)

    def apply(self, call: dict[str, Any]) -> dict[str, Any] | None:
        t = call.get("type")
        if t not in self.types:
            return call
        name = call.get("event") if t == "track" else call.get("name")
        return call if (name in self.events) == self.keep_listed else None


class AllowEvents(_EventList):
    """Keep only the listed events (other call types pass)."""

    type = "allow_events"
    keep_listed = True


class DenyEvents(_EventList):
    """Drop the listed events."""

    type = "deny_events"
    keep_listed = False


class RenameEvents(Transform):
    """Rename track events: ``{mapping: {"Old Name": "New Name"}}``."""

    type = "rename_events"

    class Settings(_Settings):
        mapping: dict[str, str]

    def apply(self, call: dict[str, Any]) -> dict[str, Any] | None:
        if call.get("type") == "track":
            new = self.settings.mapping.get(call.get("event"))
            if new is not None:
                call["event"] = new
        return call


class HashFields(Transform):
    """Replace values with SHA-256(salt + value), hex.  Strings are trimmed and
    lower-cased first (``normalize``), so ``A@x.com `` and ``a@x.com`` match."""

    type = "hash_fields"

    class Settings(_Settings):
        paths: list[str]
        salt: str
        normalize: bool = True

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.parts = [split_path(p) for p in settings.paths]
        self.salt = settings.salt.encode()

    def digest(self, value: Any) -> str:
        text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
        if self.settings.normalize:
            text = text.strip().lower()
        return hashlib.sha256(self.salt + text.encode()).hexdigest()

    def apply(self, call: dict[str, Any]) -> dict[str, Any] | None:
        for parts in self.parts:
            holder = parent_of(call, parts)
            if holder is not None and holder.get(parts[-1]) is not None:
                holder[parts[-1]] = self.digest(holder[parts[-1]])
        return call


class SetFields(Transform):
    """Set fields to fixed values: ``{values: {"context.app.env": "prod"}}``;
    with ``overwrite: false`` a value the call already has is kept."""

    type = "set_fields"

    class Settings(_Settings):
        values: dict[str, Any]
        overwrite: bool = True

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.items = [(split_path(k), v) for k, v in settings.values.items()]

    def apply(self, call: dict[str, Any]) -> dict[str, Any] | None:
        for parts, value in self.items:
            holder = parent_of(call, parts, create=True)
            assert holder is not None
            if self.settings.overwrite or parts[-1] not in holder:
                holder[parts[-1]] = msgspec.json.decode(msgspec.json.encode(value)) \
                    if isinstance(value, (dict, list)) else value
        return call


@hookimpl
def register_transforms() -> list[type[Transform]]:
    return [DropFields, AllowEvents, DenyEvents, RenameEvents, HashFields, SetFields]
