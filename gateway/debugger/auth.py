"""Basic auth for ``/debugger``: the admin's user and password, compared in
constant time (as digests, so that not even their lengths leak)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from gateway.config import AdminConfig

REALM = 'Basic realm="gateway debugger", charset="UTF-8"'


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class AdminAuth:
    """Checks an ``Authorization`` header against ``server.admin``."""

    def __init__(self, admin: AdminConfig) -> None:
        self._user = _digest(admin.user)
        self._password = _digest(admin.password)

    def allows(self, header: str | None) -> bool:
        """Whether the header carries the admin's credentials. Both parts are
        compared every time, so the time taken says nothing about which was wrong."""
        user, password = _credentials(header)
        ok_user = hmac.compare_digest(_digest(user), self._user)
        ok_password = hmac.compare_digest(_digest(password), self._password)
        return bool(ok_user & ok_password) and bool(password)


def _credentials(header: str | None) -> tuple[str, str]:
    """(user, password) of a Basic header; two empty strings when it is not one."""
    if not header:
        return "", ""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else ("", "")
