"""Waiting, bounded, for something a local server records."""

from __future__ import annotations

import asyncio
import time
from typing import Callable


async def wait_on(event: asyncio.Event, done: Callable[[], bool], timeout: float, failure: Callable[[], str],
                  poll: float = 0.1) -> None:
    """Wake on ``event`` (or every ``poll`` s) until ``done()``; fail with
    ``failure()`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(failure())
        event.clear()
        try:
            await asyncio.wait_for(event.wait(), poll)
        except asyncio.TimeoutError:
            pass
