"""A plugin with a misspelled hook (``register_destination``, no s): the
plugin manager must refuse it rather than ignore it."""

from gateway.hookspecs import hookimpl


@hookimpl
def register_destination():  # noqa: D103 - misspelled on purpose
    return []
