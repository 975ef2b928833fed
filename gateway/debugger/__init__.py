"""The debugger: a live view of what happens to calls and a status page per
destination, served by the gateway itself under ``/debugger`` behind
``server.admin`` (README.md, "Seeing what happens").

``routes`` holds the HTTP side, ``stream`` the ``text/event-stream`` of the
activity feed, ``status`` the destinations' status and dead letters,
``auth`` the Basic auth; ``page.html``, ``page.css`` and ``page.js`` are the
page, served as they are (no build step, nothing from a CDN).
"""

from __future__ import annotations

from gateway.debugger.routes import setup_debugger_routes

__all__ = ["setup_debugger_routes"]
