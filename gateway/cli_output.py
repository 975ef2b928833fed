"""How the command line prints: masked keys, and progress for long commands
(a live line on a terminal, plain lines otherwise)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from gateway.units import human_duration

def mask_key(key: str) -> str:
    """``demo-write-key`` -> ``demo-…-key``: enough to tell keys apart, not to use one."""
    if len(key) <= 8:
        return key[:1] + "…"
    return f"{key[:5]}…{key[-4:]}"


class Progress:
    """Count, rate and time left of a long command.  On a terminal one line
    is redrawn at most ten times a second; elsewhere a plain line is printed
    every ``every`` seconds, so logs stay readable."""

    def __init__(self, what: str, total: int | None = None, out: TextIO | None = None, every: float = 5.0) -> None:
        self.what = what
        self.total = total
        self.out = out if out is not None else sys.stderr
        self.tty = self.out.isatty()
        self.every = 0.1 if self.tty else every
        self.started = time.monotonic()
        self.shown = 0.0
        self.done = 0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.what}: {self.done:,}"
        if self.total:
            text += f" of {self.total:,}"
        text += f" ({rate:,.0f}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", about {human_duration((self.total - self.done) / rate)} left"
        return text + ")"

    def update(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        now = time.monotonic()
        if now - self.shown >= self.every:
            self.shown = now
            self._show()

    def _show(self) -> None:
        if self.tty:
            self.out.write("\r\x1b[K" + self.line())
        else:
            self.out.write(self.line() + "\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tty:
            self.out.write("\r\x1b[K")
            self.out.flush()
