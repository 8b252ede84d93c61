"""The dispatcher sending a share's mail through a real SMTP server or Maildir: retries with
backoff, undeliverable links reported to the sender, and a thread that wakes and stops."""

from __future__ import annotations

import datetime as dt
import mailbox
import os
import threading
import time

import pytest

from mailbridge.clock import ManualClock
from mailbridge.config import load_settings
from mailbridge.outbound import compose, dispatcher, outbox
from mailbridge.outbound.dispatcher import Dispatcher
from mailbridge.outbound.mailer import MaildirMailer, make_mailer
from mailbridge.runtime import build_runtime
from mailbridge.shares import notify
from mailbridge.store import schema
from mailbridge.store.models import AuditEvent, Clinic, Grant, Member, OutboundMessage, Share
from tests.smtp_sink import SmtpSink, free_port


def dispatch_due(runtime, mailer, **kwargs):
    """The dispatcher as `serve` runs it: a link e-mail it gives up on tells its sender."""
    return dispatcher.dispatch_due(runtime, mailer, on_failure=notify.mail_failed, **kwargs)

SENDER = "jane.doe@clinic.example"
NOTHING = {"sent": 0, "retried": 0, "failed": 0}


@pytest.fixture
def clock():
    return ManualClock(dt.datetime(2026, 11, 28, 14, 0, 0))


@pytest.fixture
def make_runtime(tmp_path, clock, db_url):
    made = []

    def make(port: int = 0, **env):
        settings = load_settings(None, env={
            "MAILBRIDGE_SERVICE_BASE_URL": "http://localhost:8080",
            "MAILBRIDGE_ADDRESSES_SHARING": "share@portal.example",
            "MAILBRIDGE_ADDRESSES_REPLY_DOMAIN": "reply.portal.example",
            "MAILBRIDGE_OUTBOUND_FROM": "mailbridge@portal.example",
            "MAILBRIDGE_SERVICE_DATA_DIR": str(tmp_path),
            "MAILBRIDGE_DATABASE_URL": db_url,
            "MAILBRIDGE_OUTBOUND_TRANSPORT": "smtp",
            "MAILBRIDGE_OUTBOUND_SMTP_PORT": str(port),
            "MAILBRIDGE_OUTBOUND_SMTP_TLS": "none",
            "MAILBRIDGE_OUTBOUND_SMTP_TIMEOUT_SECONDS": "5",
            "MAILBRIDGE_OUTBOUND_RETRY_BASE_SECONDS": "60",
            **env,
        })
        rt = build_runtime(settings, clock=clock, master_key=os.urandom(32))
        schema.upgrade(rt.db, clock())
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.db.close()


def share_with_mail(runtime, recipients: list[str]) -> tuple[Share, list[Grant]]:
    """What sharing leaves behind: a share, a grant per recipient, their links and a receipt,
    queued in one transaction."""
    now = runtime.clock()
    settings = runtime.settings
    with runtime.db.atomic():
        clinic = Clinic.create(name="Riverside PT", created_at=now)
        member = Member.create(email=SENDER, name="Jane Doe", clinic=clinic, created_at=now)
        share = Share.create(clinic=clinic, sender=member, created_at=now, dedupe_key="k1",
                             reply_key_hash="r1")
        grants = []
        for i, address in enumerate(recipients):
            grant = Grant.create(share=share, address=address, token_hash=f"t{i}",
                                 deadline=now + dt.timedelta(hours=24), created_at=now)
            grants.append(grant)
            msg = compose.link_email(settings, to=address,
                                     link_url=f"http://localhost:8080/s/tok{i}",
                                     clinic_name="Riverside PT", sender_name="Jane Doe",
                                     document_count=1, deadline_text="tomorrow 09:00")
            outbox.enqueue(runtime, msg, kind="link", to_addr=address, share=share, grant=grant)
        msg = compose.receipt_email(settings, to=SENDER, sender_name="Jane Doe",
                                    share_title="POC for patient R.T.", recipients=recipients,
                                    filenames=["plan-of-care.pdf"], deadline_text="tomorrow",
                                    reply_address="reply+abc@reply.portal.example",
                                    in_reply_to="<orig@clinic.example>")
        outbox.enqueue(runtime, msg, kind="receipt", to_addr=SENDER, share=share)
    return share, grants


def delivery(grant: Grant) -> str:
    return Grant.get_by_id(grant.id).delivery


def test_share_mail_reaches_the_relay(make_runtime):
    with SmtpSink() as sink:
        runtime = make_runtime(sink.port)
        recipients = ["dr.smith@ortho.example", "claims@insurer.example"]
        _, grants = share_with_mail(runtime, recipients)
        assert dispatch_due(runtime, make_mailer(runtime.settings)) == {**NOTHING, "sent": 3}
        got = sink.wait_for(3)
    # The receipt bounces to our From address; each link to its own VERP address.
    assert sorted(m.mail_from.split("+")[0].split("@")[0] for m in got) == [
        "bounce", "bounce", "mailbridge"]
    assert sorted(tuple(m.rcpt_tos) for m in got) == sorted(
        [(SENDER,), ("dr.smith@ortho.example",), ("claims@insurer.example",)])
    for m in got:
        if m.rcpt_tos != [SENDER]:  # a link: the recipient never sees the other recipient
            other, = set(recipients) - set(m.rcpt_tos)
            assert other.encode() not in m.raw
            assert m.message["To"] == m.rcpt_tos[0]
    assert [delivery(g) for g in grants] == ["sent", "sent"]
    assert {r.state for r in OutboundMessage.select()} == {"sent"}
    assert dispatch_due(runtime, make_mailer(runtime.settings)) == NOTHING


def test_tempfail_is_retried_with_backoff_then_sent(make_runtime, clock):
    with SmtpSink(tempfail_first=2) as sink:
        runtime = make_runtime(sink.port)
        _, (grant,) = share_with_mail(runtime, ["dr.smith@ortho.example"])
        OutboundMessage.delete().where(OutboundMessage.kind == "receipt").execute()
        mailer = make_mailer(runtime.settings)
        assert dispatch_due(runtime, mailer) == {**NOTHING, "retried": 1}
        assert dispatch_due(runtime, mailer) == NOTHING  # not due yet
        clock.advance(seconds=60)
        assert dispatch_due(runtime, mailer) == {**NOTHING, "retried": 1}
        row = OutboundMessage.get()
        assert row.next_attempt_at == clock() + dt.timedelta(seconds=120)
        assert "451" in row.last_error
        assert delivery(grant) == "queued"
        clock.advance(seconds=119)
        assert dispatch_due(runtime, mailer) == NOTHING
        clock.advance(seconds=1)
        assert dispatch_due(runtime, mailer) == {**NOTHING, "sent": 1}
        assert len(sink.wait_for(1)) == 1
        assert sink.attempts == 3
    assert delivery(grant) == "sent"


def test_refused_recipient_fails_the_link_and_tells_the_sender(make_runtime):
    with SmtpSink(refuse=["nobody@ortho.example"]) as sink:
        runtime = make_runtime(sink.port)
        share, (good, bad) = share_with_mail(runtime, ["dr.smith@ortho.example",
                                                      "nobody@ortho.example"])
        mailer = make_mailer(runtime.settings)
        runtime.wake_dispatcher.clear()
        assert dispatch_due(runtime, mailer) == {**NOTHING, "sent": 2, "failed": 1}
        assert (delivery(good), delivery(bad)) == ("sent", "failed")
        event, = AuditEvent.select().where(AuditEvent.kind == "link_undeliverable")
        assert (event.grant_id, event.share_id) == (bad.id, share.id)
        assert "550 5.1.1" in event.detail["reason"]
        notice, = OutboundMessage.select().where(OutboundMessage.kind == "notice")
        assert (notice.to_addr, notice.state) == (SENDER, "queued")
        assert runtime.wake_dispatcher.is_set()  # so the notice goes out at once

        assert dispatch_due(runtime, mailer) == {**NOTHING, "sent": 1}
        got = sink.wait_for(3)[-1]
    assert got.rcpt_tos == [SENDER]
    body = got.message.get_body(("plain",)).get_content()
    assert "nobody@ortho.example" in body and "(status 5.1.1)" in body
    # The sender's own notice names the share and is filed under its receipt.
    assert str(got.message["Subject"]) == "Re: Shared: POC for patient R.T."
    assert "Recipients: dr.smith@ortho.example, nobody@ortho.example" in body
    assert OutboundMessage.select().where(OutboundMessage.kind == "notice").count() == 1


def test_relay_down_retries_until_attempts_run_out(make_runtime, clock):
    runtime = make_runtime(free_port(), MAILBRIDGE_OUTBOUND_MAX_ATTEMPTS="2")
    _, (grant,) = share_with_mail(runtime, ["dr.smith@ortho.example"])
    mailer = make_mailer(runtime.settings)
    assert dispatch_due(runtime, mailer) == {**NOTHING, "retried": 2}
    assert delivery(grant) == "queued"
    clock.advance(seconds=60)
    assert dispatch_due(runtime, mailer) == {**NOTHING, "failed": 2}
    link = OutboundMessage.get(OutboundMessage.kind == "link")
    assert (link.state, link.attempts) == ("failed", 2)
    assert "relay unreachable" in link.last_error
    assert delivery(grant) == "failed"
    # Only the link failure is reported; a failed receipt does not cascade.
    assert OutboundMessage.select().where(OutboundMessage.kind == "notice").count() == 1
    assert AuditEvent.select().where(AuditEvent.kind == "link_undeliverable").count() == 1


def test_row_of_a_dispatcher_that_kept_crashing_is_given_up(make_runtime, clock):
    with SmtpSink() as sink:
        runtime = make_runtime(sink.port, MAILBRIDGE_OUTBOUND_MAX_ATTEMPTS="2")
        _, (grant,) = share_with_mail(runtime, ["dr.smith@ortho.example"])
        OutboundMessage.delete().where(OutboundMessage.kind == "receipt").execute()
        for _ in range(2):  # claimed, then the process died before marking it
            assert outbox.claim_due(runtime)
            clock.advance(seconds=runtime.settings.worker.lease_seconds + 1)
        assert dispatch_due(runtime, make_mailer(runtime.settings)) == {**NOTHING, "failed": 1}
        assert sink.messages == []
    assert delivery(grant) == "failed"


def test_stopping_hands_claimed_rows_back(make_runtime):
    runtime = make_runtime(free_port())
    share_with_mail(runtime, ["dr.smith@ortho.example"])
    stop = threading.Event()
    stop.set()
    assert dispatch_due(runtime, make_mailer(runtime.settings), stop=stop) == NOTHING
    assert {(r.state, r.attempts) for r in OutboundMessage.select()} == {("queued", 0)}


def test_maildir_transport_prints_the_link_for_a_local_operator(make_runtime, tmp_path, capsys):
    runtime = make_runtime(MAILBRIDGE_OUTBOUND_TRANSPORT="maildir")
    _, (grant,) = share_with_mail(runtime, ["dr.smith@ortho.example"])
    mailer = make_mailer(runtime.settings)
    assert isinstance(mailer, MaildirMailer)
    assert dispatch_due(runtime, mailer) == {**NOTHING, "sent": 2}
    link = OutboundMessage.get(OutboundMessage.kind == "link")
    out = capsys.readouterr().out
    assert out == (f"link e-mail #{link.id} (grant #{grant.id}, to …@ortho.example) "
                   f"written to {tmp_path / 'outbox'}: "
                   f"http://localhost:8080/s/tok0\n")
    box = mailbox.Maildir(tmp_path / "outbox", create=False)
    assert sorted(m["Delivered-To"] for m in box) == sorted([SENDER, "dr.smith@ortho.example"])
    assert delivery(grant) == "sent"


def test_maildir_transport_prints_an_access_request_code_too(make_runtime, tmp_path, capsys):
    runtime = make_runtime(MAILBRIDGE_OUTBOUND_TRANSPORT="maildir")
    msg = compose.code_email(runtime.settings, to="ma.lopez@ortho.example", code="123456",
                             minutes=10)
    with runtime.db.atomic():
        row = outbox.enqueue(runtime, msg, kind="access_code", to_addr="ma.lopez@ortho.example")
    assert dispatch_due(runtime, make_mailer(runtime.settings)) == {**NOTHING, "sent": 1}
    assert capsys.readouterr().out == (f"access_code e-mail #{row.id} written to "
                                       f"{tmp_path / 'outbox'}: Your mailbridge code: 123456\n")


def test_dispatcher_thread_wakes_on_new_mail_and_stops_cleanly(make_runtime):
    with SmtpSink() as sink:
        runtime = make_runtime(sink.port)
        dispatcher = Dispatcher(runtime, make_mailer(runtime.settings), poll_seconds=30,
                                on_failure=notify.mail_failed)
        dispatcher.start()
        try:
            time.sleep(0.2)  # let it finish its first, empty round and start waiting
            share_with_mail(runtime, ["dr.smith@ortho.example"])
            started = time.monotonic()
            outbox.notify(runtime)
            sink.wait_for(2, timeout=5)
            assert time.monotonic() - started < 3  # woken, not polled (poll is 30 s)
        finally:
            started = time.monotonic()
            assert dispatcher.stop(timeout=5)
            assert time.monotonic() - started < 2
    assert {r.state for r in OutboundMessage.select()} == {"sent"}


def test_phi_held_for_a_clear_text_relay_elsewhere_waits_without_using_up_attempts(
        make_runtime, clock):
    # tls = "none" to a relay that is not on loopback: the receipt (PHI) is never handed over,
    # and never given up either, so it goes out once the operator fixes the configuration.
    runtime = make_runtime(free_port(), MAILBRIDGE_OUTBOUND_SMTP_HOST="192.0.2.10")
    share_with_mail(runtime, ["dr.smith@ortho.example"])
    OutboundMessage.delete().where(OutboundMessage.kind == "link").execute()
    mailer = make_mailer(runtime.settings)
    for _ in range(runtime.settings.outbound.max_attempts + 2):
        assert dispatch_due(runtime, mailer) == {**NOTHING, "retried": 1}
        row = OutboundMessage.get()
        assert (row.kind, row.state, row.attempts) == ("receipt", "queued", 0)
        assert row.last_error.startswith("held: [outbound.smtp] tls")
        assert row.next_attempt_at == clock() + dt.timedelta(seconds=3600)
        clock.advance(seconds=3600)
def test_a_send_the_database_could_not_record_is_recorded_later_not_sent_again(make_runtime,
                                                                              db_url):
    if not db_url.startswith("postgresql"):
        pytest.skip("connections are refused on PostgreSQL")
    from playhouse.db_url import connect

    from mailbridge.outbound.dispatcher import settle_owed
    from mailbridge.store.db import UNAVAILABLE
    from tests.conftest import PG_ADMIN_URL

    name = db_url.rsplit("/", 1)[1]
    admin = connect(PG_ADMIN_URL)

    def database_gone(_received) -> None:  # at the moment the relay has the e-mail
        admin.execute_sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        admin.execute_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))

    owed: list = []
    try:
        with SmtpSink() as sink:
            runtime = make_runtime(sink.port)
            _, (grant,) = share_with_mail(runtime, ["dr.smith@ortho.example"])
            sink.on_message = database_gone
            with pytest.raises(UNAVAILABLE):
                dispatch_due(runtime, make_mailer(runtime.settings), owed=owed)
            sink.on_message = None
            assert len(sink.messages) == 1 and owed  # sent; the record and the rest owed
            admin.execute_sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
            settle_owed(owed)
            assert OutboundMessage.get(OutboundMessage.kind == "link").state == "sent"
            assert delivery(grant) == "sent"
            assert dispatch_due(runtime, make_mailer(runtime.settings)) == {**NOTHING,
                                                                           "sent": 1}
            assert sorted(m.rcpt_tos[0] for m in sink.messages) == [
                "dr.smith@ortho.example", SENDER]  # each once
    finally:
        admin.execute_sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        admin.close()
