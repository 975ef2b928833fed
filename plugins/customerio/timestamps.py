"""Timestamps for Track v2: Customer.io wants integer Unix seconds where the
Pipelines calls carry ISO-8601 strings (docs/customerio-track-v2.md §5).

These run per call and, for attribute conversion, per attribute, so they
use one compiled grammar and integer arithmetic instead of ``datetime``.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

# docs/customerio-track-v2.md §5.3: the strict grammar (used with fullmatch; ASCII digits only)
_ISO = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?(Z|([+-])(\d{2}):?(\d{2}))?)?",
    re.ASCII)
_DIGITS = re.compile(r"\d+(?:\.\d+)?", re.ASCII)  # docs/customerio-track-v2.md §5.1 T-2
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def parse_iso_unix(s: str) -> tuple[int, str] | None:
    """A strict ISO-8601 string as (whole Unix seconds, floored; the digits of
    its fraction, "" if none), or None (docs/customerio-track-v2.md §5.3)."""
    m = _ISO.fullmatch(s)
    if m is None:
        return None
    y, mo, d, hh, mi, ss, frac, _, sign, oh, om = m.groups()
    year, month, day = int(y), int(mo), int(d)
    if not 1 <= month <= 12:
        return None
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    if not 1 <= day <= _DAYS_IN_MONTH[month - 1] + (month == 2 and leap):
        return None
    hour, minute, second = int(hh or 0), int(mi or 0), int(ss or 0)
    if hour > 23 or minute > 59 or second > 59:
        return None
    offset = 0
    if sign:
        if int(oh) > 23 or int(om) > 59:
            return None
        offset = (int(oh) * 3600 + int(om) * 60) * (1 if sign == "+" else -1)
    # days from 1970-01-01 in the proleptic Gregorian calendar (Hinnant's days_from_civil)
    y2 = year - (month <= 2)
    era = y2 // 400
    yoe = y2 - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    return days * 86400 + hour * 3600 + minute * 60 + second - offset, frac or ""


def _iso_seconds(v: str) -> int | None:
    """A strict ISO string's floored seconds, or None; a cheap look first
    (this runs per attribute)."""
    if len(v) < 10 or v[4] != "-":
        return None
    p = parse_iso_unix(v)
    return None if p is None else p[0]


def to_unix(v: Any) -> int | None:
    """A top-level timestamp as integer Unix seconds, or None to leave the key
    out (docs/customerio-track-v2.md §5.1)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return math.floor(v) if math.isfinite(v) else None
    if isinstance(v, str):
        if _DIGITS.fullmatch(v):
            return int(v.partition(".")[0])
        p = parse_iso_unix(v)
        return None if p is None else p[0]
    return None


def unix_ms(v: Any) -> int:
    """The event time in Unix milliseconds, floored, for a derived event id:
    0 when absent, unparseable or negative, and 0 past the 48 bits a ULID's
    time has (docs/customerio-track-v2.md §4.10 E-4)."""
    ms = 0
    if isinstance(v, bool) or v is None:
        return 0
    if isinstance(v, int):
        ms = v * 1000
    elif isinstance(v, float):
        ms = math.floor(Decimal(repr(v)) * 1000) if math.isfinite(v) else 0
    elif isinstance(v, str):
        if _DIGITS.fullmatch(v):
            ms = math.floor(Decimal(v) * 1000)
        elif (p := parse_iso_unix(v)) is not None:
            ms = p[0] * 1000 + int(p[1][:3].ljust(3, "0"))
    return ms if 0 <= ms < 1 << 48 else 0


def convert_timestamps(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of an attribute map with its strict-ISO strings as Unix seconds,
    entering objects but not arrays (docs/customerio-track-v2.md §5.2)."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, str):
            sec = _iso_seconds(v)
            out[k] = v if sec is None else sec
        elif isinstance(v, dict):
            out[k] = convert_timestamps(v)
        else:
            out[k] = v
    return out
