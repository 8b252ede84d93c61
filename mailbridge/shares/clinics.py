"""Clinics and their own policy: time zone, how long links can be claimed, when to remind, how
long documents are kept, the contact line recipients see, the name in our From, watermarks. The
configuration gives the values a new clinic starts with; a clinic's own values win."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mailbridge.settings import Settings
from mailbridge.store.models import Clinic

MAX_TEXT = 200


class ClinicError(ValueError):
    """A clinic operation that cannot be done; `field` names the option at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Policy:
    """A clinic's values in effect (its own, else the configuration's)."""

    timezone: str
    claim_hours: float
    remind_before_hours: float
    document_retention_days: float | None  # None: kept for good
    contact: str
    display_name: str
    legal_hold: bool
    watermark: bool  # PDF pages and images handed out carry who they were shared with


@dataclass(frozen=True)
class Changes:
    """What `add`/`change` may set; None leaves a value as it is."""

    timezone: str | None = None
    claim_hours: float | None = None
    remind_before_hours: float | None = None
    document_retention_days: float | None = None  # 0: keep for good
    contact: str | None = None
    display_name: str | None = None
    legal_hold: bool | None = None
    watermark: str | None = None  # "on", "off" or "configuration"


def policy(clinic: Clinic, settings: Settings) -> Policy:
    shares = settings.shares
    return Policy(
        timezone=clinic.timezone,
        claim_hours=clinic.claim_hours or shares.claim_hours,
        remind_before_hours=(clinic.remind_before_hours if clinic.remind_before_hours
                             is not None else shares.remind_before_hours),
        document_retention_days=clinic.document_retention_days or None,
        contact=clinic.contact,
        display_name=clinic.display_name or clinic.name,
        legal_hold=clinic.legal_hold,
        watermark=(clinic.watermark if clinic.watermark is not None
                   else settings.documents.watermark),
    )


def add(name: str, changes: Changes, settings: Settings, now: dt.datetime) -> Clinic:
    """A new clinic: what `changes` sets is its own; for the rest (and the time zone, unless
    given) the configuration's values hold until the clinic sets its own."""
    name = " ".join(name.split())
    if not name or len(name) > MAX_TEXT:
        raise ClinicError("NAME", f"a clinic name must have 1 to {MAX_TEXT} characters")
    if Clinic.select().where(Clinic.name == name).exists():
        raise ClinicError("NAME", f"there is already a clinic named {name!r}")
    clinic = Clinic(name=name, created_at=now, timezone=settings.service.timezone)
    _apply(clinic, changes)
    clinic.save()
    return clinic


def change(clinic: Clinic, changes: Changes) -> Clinic:
    _apply(clinic, changes)
    clinic.save()
    return clinic


def find(name: str) -> Clinic:
    clinic = Clinic.get_or_none(Clinic.name == " ".join(name.split()))
    if clinic is None:
        raise ClinicError("NAME", f"no clinic named {name!r}")
    return clinic


def _apply(clinic: Clinic, changes: Changes) -> None:
    if changes.timezone is not None:
        clinic.timezone = _timezone(changes.timezone)
    if changes.claim_hours is not None:
        clinic.claim_hours = _number("--claim-hours", changes.claim_hours, high=24 * 30)
    if changes.remind_before_hours is not None:  # 0: no reminder
        clinic.remind_before_hours = _number("--remind-before-hours",
                                             changes.remind_before_hours, high=24 * 30,
                                             zero=True)
    if changes.document_retention_days is not None:  # 0: kept for good
        days = _number("--document-retention-days", changes.document_retention_days,
                       high=365 * 100, zero=True)
        clinic.document_retention_days = days or None
    if changes.contact is not None:
        clinic.contact = _line("--contact", changes.contact)
    if changes.display_name is not None:
        clinic.display_name = _line("--display-name", changes.display_name)
    if changes.legal_hold is not None:
        clinic.legal_hold = changes.legal_hold
    if changes.watermark is not None:
        clinic.watermark = _watermark(changes.watermark)


def _watermark(value: str) -> bool | None:
    choices = {"on": True, "off": False, "configuration": None}
    if value not in choices:
        raise ClinicError("--watermark", "must be on, off or configuration")
    return choices[value]


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ClinicError("--timezone", f"{value!r} is not an IANA time zone such as "
                          "America/New_York") from None
    return value


def _number(option: str, value: float, *, high: float, zero: bool = False) -> float:
    if not math.isfinite(value) or not (0 < value <= high or (zero and value == 0)):
        least = "0 (none)" if zero else "more than 0"
        raise ClinicError(option, f"must be {least} and at most {high:g}")
    return float(value)


def _line(option: str, value: str) -> str:
    """One line of plain text: it ends up in e-mail headers and pages."""
    text = " ".join(value.split())
    if len(text) > MAX_TEXT or any(ord(ch) < 32 for ch in text):
        raise ClinicError(option, f"must be one line of at most {MAX_TEXT} characters")
    return text
