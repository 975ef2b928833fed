"""Who sent a request: write keys to sources (constant-time comparisons), the
Authorization header's key, and the client's address behind trusted proxies."""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from typing import Iterable

from gateway.config import SourceConfig


class KeyRing:
    """Write keys → sources, compared in constant time against every key."""

    def __init__(self, sources: Iterable[SourceConfig]) -> None:
        self._keys = [(k.encode(), s) for s in sources for k in s.write_keys]

    def source_for(self, key: str | None) -> SourceConfig | None:
        if not key or not isinstance(key, str):
            return None
        given = key.encode("utf-8", "surrogateescape")
        found = None
        for k, source in self._keys:
            if hmac.compare_digest(k, given):
                found = source
        return found


_HEADER_KEYS: dict[str, str | None] = {}


def key_from_header(value: str | None) -> str | None:
    """``Basic base64(KEY:)`` or ``Bearer KEY``.  Decoded headers are cached
    (the key is still compared in constant time by KeyRing)."""
    if not value:
        return None
    try:
        return _HEADER_KEYS[value]
    except KeyError:
        pass
    key = _parse_auth(value)
    if len(_HEADER_KEYS) >= 1024:
        _HEADER_KEYS.clear()
    _HEADER_KEYS[value] = key
    return key


def _parse_auth(value: str) -> str | None:
    scheme, _, cred = value.strip().partition(" ")
    scheme = scheme.lower()
    cred = cred.strip()
    if scheme == "bearer":
        return cred or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(cred, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[0] or None
    return None


class ProxyTrust:
    """Which peers' X-Forwarded-* headers are believed."""

    def __init__(self, trusted: list[str]) -> None:
        self._nets = [ipaddress.ip_network(t, strict=False) for t in trusted]
        self.any = bool(self._nets)

    def trusts(self, addr: str | None) -> bool:
        if not self._nets or not addr:
            return False
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in n for n in self._nets)

    def client_ip(self, peer: str | None, forwarded_for: str | None) -> str | None:
        if not forwarded_for or not self.trusts(peer):
            return peer
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop
        return hops[0] if hops else peer
