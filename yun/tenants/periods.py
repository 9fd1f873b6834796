"""UTC calendar periods for quotas and usage: days and months as strings, and how long
until the next one starts (for Retry-After)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=timezone.utc)


def day_of(t: float) -> str:
    return _utc(t).strftime("%Y-%m-%d")


def month_of(t: float) -> str:
    return _utc(t).strftime("%Y-%m")


def seconds_to_next_day(t: float) -> int:
    d = _utc(t)
    nxt = (d + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil(nxt.timestamp() - t))


def seconds_to_next_month(t: float) -> int:
    d = _utc(t)
    y, m = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    nxt = datetime(y, m, 1, tzinfo=timezone.utc)
    return max(1, math.ceil(nxt.timestamp() - t))


def parse_since(value: str) -> float:
    """'2026-12-01', an ISO time, or a relative '7d' / '12h' / '30m' -> epoch seconds."""
    v = value.strip()
    units = {"d": 86400, "h": 3600, "m": 60}
    if v[-1:] in units and v[:-1].isdigit():
        return datetime.now(timezone.utc).timestamp() - int(v[:-1]) * units[v[-1]]
    try:
        d = datetime.fromisoformat(v)
    except ValueError:
        raise ValueError(f"--since: expected a date (2026-12-01), an ISO time or an age "
                         f"like 7d / 12h / 30m, got {value!r}") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return d.timestamp()
