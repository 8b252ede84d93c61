"""Typed results that end a message's trip through the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Outcome:
    """Base class; the pipeline returns exactly one of the subclasses."""


@dataclass(frozen=True)
class Ignore(Outcome):
    """Drop silently: auto-replies, bounces, loops, unauthenticated mail (no backscatter)."""

    reason: str


@dataclass(frozen=True)
class Reject(Outcome):
    """The authenticated member gets one notice (template `notice_<code>`); nothing is created.

    `details` are values the notice template shows (e.g. the offending filename).
    """

    code: str
    reason: str
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TempFail(Outcome):
    """Try again later (e.g. the database was briefly unavailable)."""

    reason: str


@dataclass(frozen=True)
class Done(Outcome):
    """The message did what it asked for; `share_id` names the share it created or touched."""

    share_id: int | None
    summary: str
