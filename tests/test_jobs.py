"""Scheduled jobs: expiry at the deadline (also with the scheduler stopped), one reminder,
one expiry summary per share, purge, the outbox and spool passes, several nodes at once, and
`mailbridge jobs run`."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import threading

import pytest
from click.testing import CliRunner

from mailbridge import jobs, spool, storage
from mailbridge.cli import cli
from mailbridge.clock import ManualClock, system_clock
from mailbridge.config import load_settings
from mailbridge.models import (
    AuditEvent,
    Document,
    Grant,
    InboundMessage,
    OneTimeCode,
    PasswordReset,
    Share,
    WebSession,
)
from mailbridge.runtime import build_runtime
from mailbridge.storage import StorageError
from mailbridge.web import access
from tests.helpers import MEMBER, MINIMAL_CONFIG, add_jane, share_message
from tests.portal_helpers import make_account, make_app
from tests.smtp_sink import SmtpSink
from tests.test_notifications import (
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


def test_expiry_with_the_scheduler_running(runtime):
    rt = configured(runtime)
    share = shared(rt)
    token = link_token(rt, grant_of(share, SMITH))
    scheduler = jobs.build_scheduler(rt)
    scheduler.start(paused=True)  # running; the test fires the jobs itself, on its clock
    try:
        expire, summary = scheduler.get_job("expire"), scheduler.get_job("expiry_summary")
        rt.clock.advance(hours=24, seconds=-1)
        assert expire.func(*expire.args) == 0 and summary.func(*summary.args) == 0
        assert "This link has expired" not in link_page(rt, token)
        rt.clock.advance(seconds=2)
        assert "This link has expired" in link_page(rt, token)
        assert expire.func(*expire.args) == 1
        assert grant_of(share, SMITH).state == "expired"
        assert summary.func(*summary.args) == 1
        assert summary.func(*summary.args) == 0
    finally:
        scheduler.shutdown()
    [(row, message)] = sent(rt, "expiry_summary")
    assert row.to_addr == MEMBER and SMITH in text_of(message)


def test_expiry_with_the_scheduler_stopped_is_decided_at_read_time(runtime):
    rt = configured(runtime)
    share = shared(rt)
    grant = grant_of(share, SMITH)
    token = link_token(rt, grant)
    rt.clock.advance(hours=24, seconds=-1)
    assert access.grant_state(grant_of(share, SMITH), rt.clock()) == "pending"
    assert "This link has expired" not in link_page(rt, token)
    rt.clock.advance(seconds=2)
    # No job ran: the row still says pending, yet the link is expired for everyone.
    assert grant_of(share, SMITH).state == "pending"
    assert access.grant_state(grant_of(share, SMITH), rt.clock()) == "expired"
    assert "This link has expired" in link_page(rt, token)
    # When the service starts again, every job runs at once: what was missed is caught up.
    scheduler = jobs.build_scheduler(rt)
    scheduler.start(paused=True)
    try:
        due = {job.id: job.next_run_time for job in scheduler.get_jobs()}
    finally:
        scheduler.shutdown()
    assert set(due) == set(jobs.JOBS)
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
    listed = {share_id: set(re.findall(r"^  - (\S+)$", text, re.M))
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
    assert {SMITH, JONES} <= set(re.findall(r"^  - (\S+)$", text_of(message), re.M))
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


# --- outbox and spool, once ------------------------------------------------------------------


def test_spool_and_outbox_jobs_process_what_is_due(runtime):
    with SmtpSink() as sink:
        rt = configured(runtime, outbound={
            "transport": "smtp",
            "smtp": dataclasses.replace(runtime.settings.outbound.smtp, port=sink.port)})
        add_jane()
        for i in range(2):
            msg = share_message(recipients=[f"dr{i}@ortho.example"])
            spool.enqueue(rt, bytes(msg), channel="smtp", envelope_from=MEMBER,
                          envelope_to=["share@portal.example"])
        assert jobs.process_spool(rt) == 2
        assert jobs.process_spool(rt) == 0
        assert jobs.dispatch_outbox(rt) == 4  # a link and a receipt each
        assert len(sink.wait_for(4)) == 4
        assert jobs.dispatch_outbox(rt) == 0


# --- purge -----------------------------------------------------------------------------------


def test_purge_deletes_only_what_retention_allows(runtime):
    rt = configured(runtime)  # spool_days 30, session_days 30, code_days 1
    share = shared(rt)
    done = InboundMessage.get()
    waiting = spool.enqueue(rt, b"Subject: x\r\n\r\nx\r\n", channel="smtp", envelope_from="",
                            envelope_to=["share@portal.example"])
    account = make_account(rt, SMITH)
    grant = grant_of(share, SMITH)
    start = rt.clock()
    WebSession.create(id_hash="ended-long-ago", account=account, created_at=start,
                      last_seen_at=start, ended_at=start)
    WebSession.create(id_hash="abandoned", account=account, created_at=start,
                      last_seen_at=start)
    OneTimeCode.create(grant=grant, code_hash="used", created_at=start,
                       expires_at=start + dt.timedelta(minutes=10), used_at=start)
    PasswordReset.create(account=account, token_hash="old", created_at=start,
                         expires_at=start + dt.timedelta(hours=1))

    rt.clock.advance(days=31)
    now = rt.clock()
    recent = spool.enqueue(rt, b"Subject: y\r\n\r\ny\r\n", channel="smtp", envelope_from="",
                           envelope_to=["share@portal.example"])
    with rt.db.atomic():
        spool.conclude(recent, "ignored", "ignore", "test", now)
    WebSession.create(id_hash="ended-today", account=account, created_at=now,
                      last_seen_at=now, ended_at=now)
    WebSession.create(id_hash="open", account=account, created_at=now, last_seen_at=now)
    OneTimeCode.create(grant=grant, code_hash="fresh", created_at=now,
                       expires_at=now + dt.timedelta(minutes=10))
    documents = [(d.blob_id, bytes(d.blob_key)) for d in Document.select()]
    events = AuditEvent.select().count()

    assert jobs.purge(rt) == 1 + 2 + 1 + 1  # raw message, sessions, code, reset link
    assert InboundMessage.get_by_id(done.id).purged_at == now
    with pytest.raises(StorageError):
        spool.read_raw(rt, InboundMessage.get_by_id(done.id))
    for kept in (waiting, recent):
        assert InboundMessage.get_by_id(kept.id).purged_at is None
        assert spool.read_raw(rt, kept)
    assert {s.id_hash for s in WebSession.select()} == {"ended-today", "open"}
    assert [c.code_hash for c in OneTimeCode.select()] == ["fresh"]
    assert not PasswordReset.select().exists()
    # Never documents or the audit trail.
    assert [storage.read_all(rt.documents, b, k)[:5] for b, k in documents] == [b"%PDF-"]
    assert AuditEvent.select().count() == events
    assert Share.get_by_id(share.id) and grant_of(share, SMITH)
    assert jobs.purge(rt) == 0


# --- the command line ------------------------------------------------------------------------



def test_jobs_run_prints_the_count_and_jobs_list_names_them(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("MAILBRIDGE_"):
            monkeypatch.delenv(name)
    cfg = tmp_path / "config.toml"
    cfg.write_text(MINIMAL_CONFIG)
    runner = CliRunner()
    assert runner.invoke(cli, ["--config", str(cfg), "init"]).exit_code == 0
    rt = build_runtime(load_settings(cfg, env={}))
    try:
        make_grant(system_clock(), hours=-1, address="a@x.example")
        make_grant(system_clock(), hours=-1, address="b@x.example")
        make_grant(system_clock(), hours=1, address="c@x.example")
    finally:
        rt.db.close()

    first = runner.invoke(cli, ["--config", str(cfg), "jobs", "run", "expire"])
    assert first.exit_code == 0 and first.stdout == "expire: 2\n"
    assert runner.invoke(cli, ["--config", str(cfg), "jobs", "run", "expire"]).stdout == \
        "expire: 0\n"
    listed = runner.invoke(cli, ["--config", str(cfg), "jobs", "list"]).stdout
    assert [line.split("\t")[0] for line in listed.splitlines()] == list(jobs.JOBS)
    unknown = runner.invoke(cli, ["--config", str(cfg), "jobs", "run", "nope"])
    assert unknown.exit_code != 0 and "no job 'nope'" in unknown.stderr


def test_a_failed_message_whose_raw_copy_was_purged_cannot_be_retried(runtime):
    from mailbridge import spool
    from tests.helpers import share_message, wire

    clock = ManualClock(dt.datetime(2026, 11, 28, 12, 0))
    rt = dataclasses.replace(runtime, clock=clock)
    row = spool.enqueue(rt, wire(share_message()), channel="smtp", envelope_from="",
                        envelope_to=["share@portal.example"])
    spool.park_failed(rt, row, "simulated")
    clock.advance(days=rt.settings.retention.spool_days + 1)
    assert jobs.purge(rt) >= 1
    assert not spool.requeue(rt, row.id)


# --- faults ------------------------------------------------------------------------------


def test_a_scheduled_job_recovers_from_cut_connections_by_itself(runtime, caplog):
    if not runtime.db.__class__.__name__.startswith("Recovering"):
        pytest.skip("connections are cut on PostgreSQL")
    from concurrent.futures import ThreadPoolExecutor

    from playhouse.db_url import connect

    from mailbridge.outages import Outage
    from tests.conftest import PG_ADMIN_URL

    stop = threading.Event()
    outage = Outage(jobs.log, "expire")
    with ThreadPoolExecutor(1) as pool:  # one thread, as a pooled scheduler thread is reused
        def run():
            return pool.submit(jobs._guarded, jobs.expire_grants, outage, runtime, stop).result()

        assert run() == 0
        admin = connect(PG_ADMIN_URL)
        admin.execute_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()",
                          (runtime.db.database,))
        admin.close()
        make_grant(system_clock() - dt.timedelta(hours=25))
        assert run() == 1
    assert not outage.active


def test_a_stopping_service_ends_the_outbox_and_spool_jobs_between_items(runtime):
    add_jane()
    stop = threading.Event()
    stop.set()
    spool.enqueue(runtime, bytes(share_message()), channel="smtp", envelope_from=MEMBER,
                  envelope_to=["share@portal.example"])
    assert jobs.process_spool(runtime, stop=stop) == 0
    assert jobs.dispatch_outbox(runtime, stop=stop) == 0
    assert InboundMessage.get().state == "queued"
