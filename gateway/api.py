"""The plugin API: the one module a plugin imports from ``gateway``.

Built-in plugins (``plugins/``) import nothing else from ``gateway``, so a
third-party plugin has exactly their power (``tests/test_plugin_api.py``
enforces it).  What this module exports is documented in docs/plugins.md,
and only what is documented there is stable; everything else in ``gateway``
may change without notice.
"""

from __future__ import annotations

from aiohttp import web

from gateway.app_state import CONFIG
from gateway.config import Config
from gateway.dotted import get_path, parent_of, split_path
from gateway.events import CALL_TYPES, STRIPPED_KEYS
from gateway.hookspecs import hookimpl
from gateway.http_client import HttpClient, basic_auth
from gateway.ingest.call_checks import Rejection, check_call
from gateway.outcomes import (
    BODY_EXCERPT, DELIVERED, Delivered, Failed, MappingError, Outcome, Paused, Retry, outcome_for_status,
    parse_retry_after,
)
from gateway.plugin_classes import Destination, Limits, Transform


def config_of(app: web.Application) -> Config:
    """The loaded config of the app a ``startup``/``shutdown`` hook is given."""
    return app[CONFIG]


__all__ = [
    # hooks
    "hookimpl",
    # the classes a plugin subclasses
    "Destination", "Transform", "Limits",
    # what a destination's send reports, per call
    "Outcome", "Delivered", "DELIVERED", "Retry", "Failed", "MappingError", "Paused",
    # HTTP
    "HttpClient", "basic_auth", "outcome_for_status", "parse_retry_after", "BODY_EXCERPT",
    # calls
    "split_path", "get_path", "parent_of", "check_call", "Rejection", "CALL_TYPES", "STRIPPED_KEYS",
    # lifecycle hooks
    "config_of", "Config",
]
