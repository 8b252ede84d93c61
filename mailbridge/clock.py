"""Time as a value passed around, so tests move a clock instead of sleeping."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from zoneinfo import ZoneInfo

Clock = Callable[[], dt.datetime]  # returns naive UTC, the form stored in the database


def system_clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def local_text(at: dt.datetime, timezone: str) -> str:
    """A stored (naive UTC) time as people read it in `timezone`: "Sat 28 Nov 2026, 09:00 EST"."""
    local = at.replace(tzinfo=dt.UTC).astimezone(ZoneInfo(timezone))
    return local.strftime("%a %d %b %Y, %H:%M %Z")


class ManualClock:
    """A clock for tests: starts at `start` and moves only when told."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or system_clock()

    def __call__(self) -> dt.datetime:
        return self._now

    def advance(self, **delta: float) -> None:
        self._now += dt.timedelta(**delta)
