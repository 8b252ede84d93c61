"""Typed results that end a message's trip through the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True)
class Outcome:
    """Base class; the pipeline returns exactly one of the subclasses."""


@dataclass(frozen=True)
class Ignore(Outcome):
    """Drop silently: auto-replies, bounces, loops, unauthenticated mail (no backscatter)."""

    reason: str


class Notice(StrEnum):
    """The notices a member can get about a message (`templates/email/notice_<code>.txt`)."""

    NO_RECIPIENTS = "no_recipients"
    BAD_RECIPIENT = "bad_recipient"
    OWN_ADDRESS = "own_address"
    TOO_MANY_RECIPIENTS = "too_many_recipients"
    NO_ATTACHMENTS = "no_attachments"
    DISALLOWED_TYPE = "disallowed_type"
    TOO_LARGE = "too_large"
    TOO_LARGE_TOTAL = "too_large_total"
    TOO_MANY_PARTS = "too_many_parts"
    TOO_DEEP = "too_deep"
    TNEF = "tnef"
    UNREADABLE_ATTACHMENT = "unreadable_attachment"
    LINK_UNDELIVERABLE = "link_undeliverable"
    REPLY_NOT_ALLOWED = "reply_not_allowed"
    REPLY_UNKNOWN = "reply_unknown"


@dataclass(frozen=True)
class Reject(Outcome):
    """The authenticated member gets one notice (template `notice_<code>`); nothing is created.

    `details` are values the notice template shows (e.g. the offending filename).
    """

    code: Notice
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
