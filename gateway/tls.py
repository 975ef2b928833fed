"""``server.tls``: the SSLContext ``gateway serve`` hands to aiohttp's TCPSite."""

from __future__ import annotations

import ssl

from gateway.config import Config, ConfigError, _line_of, node_of


def server_ssl_context(cfg: Config) -> ssl.SSLContext | None:
    """HTTPS with the configured PEM certificate (chain) and key, or None
    without ``server.tls``.  A file that cannot be read or used is a
    ConfigError naming the key and its line, raised before the port is bound."""
    tls = cfg.server.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as e:
        line = _line_of(node_of(cfg), "$.server.tls", None)
        where = f"line {line}: " if line else ""
        raise ConfigError(f"{where}server.tls: cannot use certificate {tls.cert!r} with key {tls.key!r}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    return context
