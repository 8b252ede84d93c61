"""Time as a value passed around, so tests move a clock instead of sleeping."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

Clock = Callable[[], dt.datetime]  # returns naive UTC, the form stored in the database


def system_clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class ManualClock:
    """A clock for tests: starts at `start` and moves only when told."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or system_clock()

    def __call__(self) -> dt.datetime:
        return self._now

    def advance(self, **delta: float) -> None:
        self._now += dt.timedelta(**delta)
