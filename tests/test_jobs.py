"""Scheduled jobs: expiry at the deadline, idempotent, counted."""

from __future__ import annotations

import dataclasses
import datetime as dt

from mailbridge import jobs
from mailbridge.clock import ManualClock
from mailbridge.models import AuditEvent, Grant, Share
from tests.helpers import add_jane


def make_grant(now, hours=24, address="dr@x.example", state="pending"):
    member = add_jane() if not Share.select().exists() else Share.get().sender
    share = Share.get_or_none() or Share.create(
        clinic=member.clinic, sender=member, title="t", created_at=now, dedupe_key="k",
        reply_key_hash="r")
    return Grant.create(share=share, address=address, token_hash=address, state=state,
                        deadline=now + dt.timedelta(hours=hours), created_at=now)


def test_grant_expires_at_deadline_not_before(runtime):
    clock = ManualClock(dt.datetime(2026, 11, 28, 12, 0))
    rt = dataclasses.replace(runtime, clock=clock)
    grant = make_grant(clock())
    clock.advance(hours=24, seconds=-1)
    assert jobs.expire_grants(rt) == 0
    assert Grant.get_by_id(grant.id).state == "pending"
    clock.advance(seconds=2)
    assert jobs.expire_grants(rt) == 1
    expired = Grant.get_by_id(grant.id)
    assert expired.state == "expired" and expired.ended_at == clock()
    assert AuditEvent.get(AuditEvent.kind == "grant_expired").grant_id == grant.id
    assert jobs.expire_grants(rt) == 0  # idempotent


def test_claimed_grants_never_expire(runtime):
    clock = ManualClock(dt.datetime(2026, 11, 28, 12, 0))
    rt = dataclasses.replace(runtime, clock=clock)
    make_grant(clock(), address="a@x.example", state="claimed")
    make_grant(clock(), address="b@x.example")
    clock.advance(hours=48)
    assert jobs.expire_grants(rt, batch=1) == 1
    assert {g.address: g.state for g in Grant.select()} == {"a@x.example": "claimed",
                                                            "b@x.example": "expired"}
