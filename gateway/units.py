"""Sizes, durations and clients' values as people read them."""

from __future__ import annotations

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


#: characters of a client's value that a refusal's message shows: it must not echo megabytes
SHOWN = 60


def shown(value: object, limit: int = SHOWN) -> str:
    """``repr(value)``, cut at ``limit`` characters with how long it was: a
    message that names a client's value (or what a test saw) stays short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
