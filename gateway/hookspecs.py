"""The hooks a gateway plugin may implement.

Registry hooks return classes keyed by their ``type`` string; the gateway
builds objects from them once, at start, and calls those objects directly, so
pluggy's dispatch is never paid per event.  Every hook is documented, with an
example, in docs/plugins.md (tests/test_docs.py fails when one is not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable

import pluggy

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.plugin_classes import Destination, Transform

hookspec = pluggy.HookspecMarker("gateway")
hookimpl = pluggy.HookimplMarker("gateway")


@hookspec
def register_destinations() -> list[type["Destination"]]:
    """Return destination classes this plugin provides."""


@hookspec
def register_transforms() -> list[type["Transform"]]:
    """Return transform classes this plugin provides."""


@hookspec
def startup(app: "web.Application") -> Awaitable[Any] | None:
    """Called once when the server starts, after the spool is open; may return an awaitable."""


@hookspec
def shutdown(app: "web.Application") -> Awaitable[Any] | None:
    """Called once when the server stops, before the spool closes; may return an awaitable."""
