"""Clinics and their members: the staff allowed to share."""

from __future__ import annotations

import datetime as dt

from mailbridge.mail.addresses import normalise
from mailbridge.store.models import Clinic, Member


class MemberError(ValueError):
    """A member operation that cannot be done; the message says why."""


def normalise_address(address: str) -> str:
    normalised = normalise(address)
    if normalised is None:
        raise MemberError(f"{address!r} is not a valid e-mail address")
    return normalised


def find_active(address: str | None) -> Member | None:
    if not address:
        return None
    return (Member.select(Member, Clinic).join(Clinic)
            .where((Member.email == address.lower()) & (Member.active == True))  # noqa: E712
            .first())


def add_member(email: str, name: str, clinic_name: str, now: dt.datetime, *,
               timezone: str = "UTC", admin: bool = False) -> Member:
    """Add (or re-activate) a member; the clinic is created on first use."""
    address = normalise_address(email)
    if not name.strip():
        raise MemberError("--name must not be empty")
    clinic, _ = Clinic.get_or_create(name=clinic_name.strip(),
                                     defaults={"timezone": timezone, "created_at": now})
    existing = Member.get_or_none(Member.email == address)
    if existing:
        if existing.active:
            raise MemberError(f"{address} is already an active member")
        existing.active, existing.name, existing.clinic, existing.is_admin = (
            True, name.strip(), clinic, admin)
        existing.save()
        return existing
    return Member.create(email=address, name=name.strip(), clinic=clinic, is_admin=admin,
                         created_at=now)


def set_admin(email: str, admin: bool) -> Member:
    """Make a member an admin of their clinic, or no longer one."""
    member = Member.get_or_none(Member.email == normalise_address(email))
    if member is None:
        raise MemberError(f"{email} is not a member")
    member.is_admin = admin
    member.save()
    return member


def disable_member(email: str) -> Member:
    address = normalise_address(email)
    member = Member.get_or_none(Member.email == address)
    if member is None:
        raise MemberError(f"{address} is not a member")
    member.active = False
    member.save()
    return member
