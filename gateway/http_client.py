"""The HTTP client every destination is built with.

One connection pool serves every destination of an app; each destination
gets a client around it that waits for the destination's rate-limit turn
before every request it makes (a split or a bisection of a batch included),
as Vector's rate-limit layer wraps a sink's service.  No plugin has to
remember to throttle, and no engine patches a plugin.
"""

from __future__ import annotations

import asyncio
import base64
import time
from types import TracebackType
from typing import Any

import aiohttp


class Throttle:
    """At most ``rate`` requests per ``per`` seconds, with bursts of ``rate``
    (a token bucket)."""

    def __init__(self, rate: float, per: float) -> None:
        self.capacity = max(1.0, rate)
        self.fill = rate / per
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.fill)
        self.stamp = now

    async def ready(self) -> None:
        """Wait until a request may go, without taking the turn."""
        while True:
            self._refill()
            if self.tokens >= 1:
                return
            await asyncio.sleep((1 - self.tokens) / self.fill)

    async def take(self) -> None:
        """Wait for a turn and take it."""
        while True:
            await self.ready()
            self._refill()
            if self.tokens >= 1:
                self.tokens -= 1
                return


class HttpPool:
    """The app's one ``aiohttp.ClientSession``, opened at its first request
    (a session belongs to the running event loop) and closed at shutdown."""

    def __init__(self, limit_per_host: int = 64) -> None:
        self.limit_per_host = limit_per_host
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=self.limit_per_host))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Request:
    """``async with client.post(...) as resp``: the turn, then aiohttp's request."""

    __slots__ = ("client", "method", "url", "kwargs", "_cm")

    def __init__(self, client: "HttpClient", method: str, url: str, kwargs: dict[str, Any]) -> None:
        self.client = client
        self.method = method
        self.url = url
        self.kwargs = kwargs
        self._cm: Any = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        await self.client.throttle.take()
        self._cm = self.client.pool.session().request(self.method, self.url, **self.kwargs)
        return await self._cm.__aenter__()  # type: ignore[no-any-return]

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._cm.__aexit__(et, e, tb)


class HttpClient:
    """What a destination's ``self.http`` is: aiohttp's ``request``, ``get``,
    ``post``, ``put`` and ``delete``, each waiting for the destination's turn."""

    def __init__(self, pool: HttpPool, throttle: Throttle) -> None:
        self.pool = pool
        self.throttle = throttle

    def request(self, method: str, url: str, **kwargs: Any) -> _Request:
        return _Request(self, method, url, kwargs)

    def get(self, url: str, **kwargs: Any) -> _Request:
        return _Request(self, "GET", url, kwargs)

    def post(self, url: str, **kwargs: Any) -> _Request:
        return _Request(self, "POST", url, kwargs)

    def put(self, url: str, **kwargs: Any) -> _Request:
        return _Request(self, "PUT", url, kwargs)

    def delete(self, url: str, **kwargs: Any) -> _Request:
        return _Request(self, "DELETE", url, kwargs)


def basic_auth(username: str, password: str = "") -> str:
    """An ``Authorization: Basic`` header value (aiohttp 3.14 deprecates ``BasicAuth``)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
