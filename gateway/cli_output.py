"""How the command line prints: human sizes and durations, masked keys,
and progress for long commands (a live line on a terminal, plain lines
otherwise)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_SIZE_UNITS = ((1024**4, "TiB"), (1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB"))


def human_size(n: float) -> str:
    """``10737418240`` -> ``10 GiB``; ``65536`` -> ``64 KiB``; ``500`` -> ``500 B``."""
    for size, unit in _SIZE_UNITS:
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) or v >= 100 else f"{v:.1f} {unit}"
    return f"{int(n)} B"


def human_duration(seconds: float) -> str:
    """``86400`` -> ``24h``; ``5400`` -> ``1h30m``; ``0.5`` -> ``0.5s``; ``0`` -> ``0s``."""
    if seconds < 60:
        return f"{seconds:g}s" if seconds < 10 else f"{seconds:.0f}s"
    out = []
    rest = int(round(seconds))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if rest >= size:
            out.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(out[:2])


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

    def update(self, done: int) -> None:
        self.done = done
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
