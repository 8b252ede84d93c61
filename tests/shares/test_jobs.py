"""The share jobs: expiry at the deadline (also with the scheduler stopped), one reminder, one
expiry summary per share, and several nodes running them at once."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import threading

from peewee import fn

from mailbridge import schedule
from mailbridge.clock import ManualClock
from mailbridge.shares import jobs, lifecycle
from mailbridge.store import audit
from mailbridge.store.models import (
    AuditEvent,
    Grant,
    Share,
)
from tests.helpers import add_jane
from tests.portal_helpers import make_app
from tests.shares.test_notify import (
    JONES,
    SMITH,
    configured,
    grant_of,
    link_token,
    sent,
    shared,
    text_of,
)


def make_grant(now, hours=24, address="dr@x.example", state="pending"):
    member = add_jane() if not Share.select().exists() else Share.get().sender
    share = Share.get_or_none() or Share.create(
        clinic=member.clinic, sender=member, created_at=now, dedupe_key="k",
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


# --- expiry with the scheduler running and stopped -------------------------------------------


def link_page(rt, token: str) -> str:
    return make_app(rt).test_client().get(f"/s/{token}").get_data(as_text=True)


def test_expiry_with_the_scheduler_stopped_is_decided_at_read_time(runtime):
    rt = configured(runtime)
    share = shared(rt)
    grant = grant_of(share, SMITH)
    token = link_token(rt, grant)
    rt.clock.advance(hours=24, seconds=-1)
    assert lifecycle.effective_state(grant_of(share, SMITH), rt.clock()) == "pending"
    assert "This link has expired" not in link_page(rt, token)
    rt.clock.advance(seconds=2)
    # No job ran: the row still says pending, yet the link is expired for everyone.
    assert grant_of(share, SMITH).state == "pending"
    assert lifecycle.effective_state(grant_of(share, SMITH), rt.clock()) == "expired"
    assert "This link has expired" in link_page(rt, token)
    # When the service starts again, every job runs at once: what was missed is caught up.
    scheduler = schedule.build_scheduler(rt)
    scheduler.start(paused=True)
    try:
        due = {job.id: job.next_run_time for job in scheduler.get_jobs()}
    finally:
        scheduler.shutdown()
    assert set(due) == set(schedule.JOBS)
    assert set(due.values()) == {rt.clock().replace(tzinfo=dt.UTC)}


# --- reminders -------------------------------------------------------------------------------


def test_one_reminder_in_the_window_before_the_deadline(runtime):
    rt = configured(runtime)  # claim_hours 24, remind_before_hours 4
    share = shared(rt, recipients=(SMITH, JONES))
    rt.clock.advance(hours=20, seconds=-1)
    assert jobs.remind_grants(rt) == 0
    rt.clock.advance(seconds=2)
    assert jobs.remind_grants(rt) == 2
    rt.clock.advance(hours=1)
    assert jobs.remind_grants(rt) == 0
    assert sorted(row.to_addr for row, _ in sent(rt, "reminder")) == [JONES, SMITH]
    assert all(grant_of(share, a).reminded_at is not None for a in (SMITH, JONES))


def test_no_reminder_when_disabled_claimed_undeliverable_or_past(runtime):
    off = configured(runtime, shares={"remind_before_hours": 0})
    share = shared(off, recipients=(SMITH, JONES, "pa@ortho.example"))
    off.clock.advance(hours=23)
    assert jobs.remind_grants(off) == 0
    on = configured(runtime, off.clock)
    Grant.update(state="claimed").where(Grant.address == SMITH).execute()
    Grant.update(delivery="failed").where(Grant.address == JONES).execute()
    on.clock.advance(hours=2)  # past the deadline: too late to remind
    assert jobs.remind_grants(on) == 0
    assert sent(on, "reminder") == []
    assert grant_of(share, "pa@ortho.example").reminded_at is None


def test_no_reminder_when_the_window_covers_the_whole_claim_time(runtime):
    rt = configured(runtime, shares={"remind_before_hours": 24})
    shared(rt)
    rt.clock.advance(hours=1)
    assert jobs.remind_grants(rt) == 0


# --- expiry summaries ------------------------------------------------------------------------


def test_one_expiry_summary_per_share_listing_exactly_the_unclaimed(runtime):
    rt = configured(runtime)
    first = shared(rt, recipients=(SMITH, JONES, "claims@insurer.example"))
    second = shared(rt, recipients=("counsel@law.example",), subject="Second")
    Grant.update(state="claimed").where(Grant.address == "claims@insurer.example").execute()
    rt.clock.advance(hours=24, seconds=1)
    assert jobs.expire_grants(rt) == 3
    assert jobs.report_expired(rt) == 2
    assert jobs.report_expired(rt) == 0
    summaries = {row.share_id: text_of(message) for row, message in sent(rt, "expiry_summary")}
    assert set(summaries) == {first.id, second.id}
    listed = {share_id: set(re.findall(r"^- (\S+)$", text, re.M))
              for share_id, text in summaries.items()}
    assert listed == {first.id: {SMITH, JONES}, second.id: {"counsel@law.example"}}


def test_summary_waits_until_every_lapsed_grant_of_the_share_is_expired(runtime):
    rt = configured(runtime)
    share = shared(rt, recipients=(SMITH, JONES))
    rt.clock.advance(hours=25)
    Grant.update(state="expired").where(Grant.address == SMITH).execute()
    assert jobs.report_expired(rt) == 0  # JONES lapsed too but `expire` has not reached it
    assert jobs.expire_grants(rt) == 1
    assert jobs.report_expired(rt) == 1
    [(_, message)] = sent(rt, "expiry_summary")
    assert {SMITH, JONES} <= set(re.findall(r"^- (\S+)$", text_of(message), re.M))
    assert all(grant_of(share, a).expiry_reported_at == rt.clock() for a in (SMITH, JONES))


def test_expiry_summary_turned_off_marks_without_sending(runtime):
    rt = configured(runtime, notifications={"expiry_summary": False})
    share = shared(rt)
    rt.clock.advance(hours=25)
    jobs.expire_grants(rt)
    assert jobs.report_expired(rt) == 1
    assert sent(rt, "expiry_summary") == []
    assert grant_of(share, SMITH).expiry_reported_at == rt.clock()
    assert jobs.report_expired(rt) == 0


# --- several nodes at once -------------------------------------------------------------------


def in_threads(rt, function, count: int = 3) -> list:
    """Run `function(rt)` in `count` threads released at the same moment (as on several
    nodes); returns their results."""
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = function(rt)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            rt.db.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_concurrent_runs_send_each_email_once(runtime):
    rt = configured(runtime)
    shares = [shared(rt, recipients=(f"dr{i}@ortho.example", f"pa{i}@ortho.example"),
                     subject=f"share {i}") for i in range(4)]
    rt.clock.advance(hours=21)
    assert sum(in_threads(rt, jobs.remind_grants)) == 8
    assert len(sent(rt, "reminder")) == 8
    rt.clock.advance(hours=4)
    results = in_threads(rt, lambda r: (jobs.expire_grants(r), jobs.report_expired(r)))
    assert sum(expired for expired, _ in results) == 8
    assert sum(summaries for _, summaries in results) == 4
    assert sorted(row.share_id for row, _ in sent(rt, "expiry_summary")) == [
        s.id for s in shares]
    assert AuditEvent.select().where(AuditEvent.kind == "grant_expired").count() == 8


# --- in bulk --------------------------------------------------------------------------------


def seed_due(now: dt.datetime, count: int, per_share: int = 4) -> None:
    """`count` pending grants past their deadline, `per_share` to a share, inserted in bulk."""
    member = add_jane()
    shares = [dict(clinic=member.clinic, sender=member, created_at=now, dedupe_key=f"bulk-{i}",
                   reply_key_hash=f"bulk-{i}") for i in range(-(-count // per_share))]
    for start in range(0, len(shares), 2000):
        Share.insert_many(shares[start:start + 2000]).execute()
    share_ids = [s.id for s in Share.select(Share.id).order_by(Share.id)]
    grants = [dict(share=share_ids[i // per_share], address=f"r{i}@ortho.example",
                   token_hash=f"bulk-{i}", state="pending", deadline=now - dt.timedelta(hours=1),
                   created_at=now - dt.timedelta(hours=25)) for i in range(count)]
    for start in range(0, count, 2000):
        Grant.insert_many(grants[start:start + 2000]).execute()


def test_bulk_expiry_by_two_nodes_audits_each_grant_once_in_a_chain_that_verifies(runtime):
    clock = ManualClock(dt.datetime(2026, 11, 28, 12, 0))
    rt = dataclasses.replace(runtime, clock=clock)
    seed_due(clock(), 25_000)
    audit.record(rt.audit_key, "document_viewed", clock(), actor="before@x.example")
    # Two nodes at once, each in batches smaller than the whole.
    results = in_threads(rt, lambda r: jobs.expire_grants(r, batch=4000), count=2)
    assert sum(results) == 25_000
    assert Grant.select().where(Grant.state == "pending").count() == 0
    assert Grant.select().where((Grant.state == "expired")
                                & (Grant.ended_at == clock())).count() == 25_000
    events = (AuditEvent.select(AuditEvent.grant, fn.COUNT(AuditEvent.id).alias("n"))
              .where(AuditEvent.kind == "grant_expired").group_by(AuditEvent.grant))
    per_grant = {row.grant_id: row.n for row in events}
    assert len(per_grant) == 25_000 and set(per_grant.values()) == {1}
    # Each event names its own grant's share.
    assert not (AuditEvent.select().join(Grant, on=(AuditEvent.grant == Grant.id))
                .where(AuditEvent.share != Grant.share).exists())
    assert jobs.expire_grants(rt, batch=4000) == 0  # nothing left for a third run
    verdict = audit.verify(rt.audit_key)
    assert verdict.ok, verdict
    assert verdict.checked == 25_001 and audit.head()[0] == 25_001


# --- outbox and spool, once ------------------------------------------------------------------
