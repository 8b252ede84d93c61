"""Bounces: link e-mails carry a VERP return path with a MAC; a delivery failure report (RFC
3464, as Postfix, Exim, Gmail and Microsoft 365 write them) sent back to it marks the grant
undeliverable and tells the sender once. Delays, auto-replies and forged bounce addresses
change nothing, and nothing arriving at a bounce address is ever answered."""

from __future__ import annotations

import re
import time
from email import policy
from email.parser import BytesParser

import pytest

from mailbridge import pipeline
from mailbridge.outbound import outbox
from mailbridge.outcomes import Done, Ignore
from mailbridge.receive import spool
from mailbridge.shares import notify
from mailbridge.shares.bounce import failed_recipients
from mailbridge.store.models import AuditEvent, Grant, InboundMessage, OutboundMessage
from tests.conftest import CORPUS, MAIL
from tests.helpers import MEMBER, add_jane, share_message
from tests.shares.test_notify import SMITH, configured, grant_of, sent, shared, text_of

VERP = re.compile(r"bounce\+(\d+)\.([0-9a-f]{10})@reply\.portal\.example")
FAILED = ["bounce_postfix.eml", "bounce_exim.eml", "bounce_gmail.eml", "bounce_m365.eml"]


def link_row(share, address=SMITH) -> OutboundMessage:
    return OutboundMessage.get((OutboundMessage.kind == "link")
                               & (OutboundMessage.grant == grant_of(share, address)))


def bounce(rt, name: str, to: str):
    """Spool a report for `to` (null sender, as MTAs send them) and run it through the
    pipeline; returns the outcome."""
    raw = (MAIL / name).read_bytes()
    spool.enqueue(rt, raw, channel="smtp", envelope_from="", envelope_to=[to])
    row = spool.claim_next(rt, "test")
    return pipeline.process(rt, row, raw)


def last_inbound() -> InboundMessage:
    return InboundMessage.select().order_by(InboundMessage.id.desc()).first()


def notices(rt) -> list:
    return sent(rt, "notice")


# --- VERP ------------------------------------------------------------------------------------


def test_link_mail_gets_its_own_signed_return_path_and_the_receipt_does_not(runtime):
    rt = configured(runtime)
    share = shared(rt, recipients=(SMITH, "dr.jones@ortho.example"))
    links = list(OutboundMessage.select().where(OutboundMessage.kind == "link"))
    assert len(links) == 2
    for row in links:
        match = VERP.fullmatch(row.envelope_from)
        assert match and int(match[1]) == row.id
        assert outbox.verp_outbound_id(rt, row.envelope_from) == row.id
        assert outbox.verp_outbound_id(rt, f"<{row.envelope_from.upper()}>") == row.id
    receipt = OutboundMessage.get(OutboundMessage.kind == "receipt")
    assert receipt.envelope_from == "mailbridge@portal.example"
    assert share.receipt_message_id == receipt.message_id


def test_forged_bounce_addresses_name_no_row(runtime):
    rt = configured(runtime)
    row = link_row(shared(rt))
    number, mac = VERP.fullmatch(row.envelope_from).groups()
    other = "0" if mac[-1] != "0" else "1"
    for forged in (f"bounce+{number}.{mac[:-1]}{other}@reply.portal.example",  # wrong MAC
                   f"bounce+{int(number) + 1}.{mac}@reply.portal.example",  # MAC of another row
                   f"bounce+{number}.{mac}@elsewhere.example",
                   f"bounce+{number}@reply.portal.example",
                   "bounce+x@reply.portal.example"):
        assert outbox.verp_outbound_id(rt, forged) is None


# --- reports ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAILED)
def test_failure_report_marks_the_grant_and_tells_the_sender_once(runtime, name):
    rt = configured(runtime)
    share = shared(rt, recipients=(SMITH, "dr.jones@ortho.example"))
    row = link_row(share)
    rt.wake_dispatcher.clear()
    outcome = bounce(rt, name, row.envelope_from)
    assert isinstance(outcome, Done) and outcome.share_id == share.id
    assert grant_of(share, SMITH).delivery == "failed"
    assert grant_of(share, "dr.jones@ortho.example").delivery == "queued"
    assert last_inbound().state == "done"
    event = AuditEvent.get(AuditEvent.kind == "link_bounced")
    assert (event.grant_id, event.detail["outbound_id"]) == (grant_of(share, SMITH).id, row.id)
    [(notice_row, notice)] = notices(rt)
    assert notice_row.to_addr == MEMBER and notice_row.envelope_from == "mailbridge@portal.example"
    assert notice["In-Reply-To"] == share.receipt_message_id
    body = text_of(notice)
    assert SMITH in body
    assert re.search(r"5\.\d\.\d", body)  # what the recipient's server said, or its status
    assert rt.wake_dispatcher.is_set()
    # Never an answer to the bounce itself: the notice is the only new mail.
    assert {r.to_addr for r in OutboundMessage.select()} == {MEMBER, SMITH,
                                                             "dr.jones@ortho.example"}


def test_a_second_report_for_the_same_grant_sends_no_second_notice(runtime):
    rt = configured(runtime)
    share = shared(rt)
    row = link_row(share)
    assert isinstance(bounce(rt, "bounce_postfix.eml", row.envelope_from), Done)
    outcome = bounce(rt, "bounce_gmail.eml", row.envelope_from)
    assert isinstance(outcome, Done) and "already" in outcome.summary
    assert len(notices(rt)) == 1
    assert AuditEvent.select().where(AuditEvent.kind == "link_bounced").count() == 1


def test_report_after_the_relay_already_refused_the_link_sends_no_second_notice(runtime):
    rt = configured(runtime)
    share = shared(rt)
    row = link_row(share)
    with rt.db.atomic():  # what the dispatcher does when the relay refuses the link
        assert notify.mail_failed(rt, row, "550 5.1.1 refused")
    assert isinstance(bounce(rt, "bounce_postfix.eml", row.envelope_from), Done)
    assert len(notices(rt)) == 1


def test_delay_warning_changes_nothing(runtime):
    rt = configured(runtime)
    share = shared(rt)
    row = link_row(share)
    outcome = bounce(rt, "bounce_postfix_delayed.eml", row.envelope_from)
    assert isinstance(outcome, Ignore)
    assert grant_of(share, SMITH).delivery == "queued"
    assert notices(rt) == [] and not AuditEvent.select().where(
        AuditEvent.kind == "link_bounced").exists()
    assert last_inbound().state == "ignored"


@pytest.mark.parametrize("name", ["auto_reply_ooo.eml", "plain_share_two_pdfs.eml"])
def test_auto_replies_and_other_mail_to_a_bounce_address_are_ignored(runtime, name):
    rt = configured(runtime)
    share = shared(rt)
    row = link_row(share)
    before = OutboundMessage.select().count()
    assert isinstance(bounce(rt, name, row.envelope_from), Ignore)
    assert grant_of(share, SMITH).delivery == "queued"
    assert OutboundMessage.select().count() == before


def test_forged_bounce_address_changes_nothing(runtime):
    rt = configured(runtime)
    share = shared(rt)
    number, mac = VERP.fullmatch(link_row(share).envelope_from).groups()
    forged = f"bounce+{number}.{'0' * 10 if mac != '0' * 10 else '1' * 10}@reply.portal.example"
    outcome = bounce(rt, "bounce_postfix.eml", forged)
    assert isinstance(outcome, Ignore) and "MAC" in outcome.reason
    assert grant_of(share, SMITH).delivery == "queued" and notices(rt) == []


def test_valid_address_of_a_message_that_is_not_a_link_is_ignored(runtime):
    rt = configured(runtime)
    share = shared(rt)
    receipt = OutboundMessage.get(OutboundMessage.kind == "receipt")
    assert isinstance(bounce(rt, "bounce_postfix.eml", outbox.verp_address(rt, receipt.id)),
                      Ignore)
    assert grant_of(share, SMITH).delivery == "queued" and notices(rt) == []


def test_late_report_for_a_claimed_link_is_ignored(runtime):
    rt = configured(runtime)
    share = shared(rt)
    Grant.update(state="claimed").where(Grant.id == grant_of(share, SMITH).id).execute()
    assert isinstance(bounce(rt, "bounce_postfix.eml", link_row(share).envelope_from), Ignore)
    assert grant_of(share, SMITH).delivery == "queued" and notices(rt) == []


def test_notice_respects_the_delivery_failure_setting(runtime):
    rt = configured(runtime, notifications={"delivery_failure": False})
    share = shared(rt)
    assert isinstance(bounce(rt, "bounce_m365.eml", link_row(share).envelope_from), Done)
    assert grant_of(share, SMITH).delivery == "failed" and notices(rt) == []


# --- the report parser on real-world mail ----------------------------------------------------

AUTOREPLY_BOUNCE = CORPUS / "autoreply_bounce"
CORPUS_FAILED = {
    "set-of-emails__lhost-outlook-01.eml": ("kijitora@example.jp", "5.2.2"),
    "mailparser__delivery-status.eml": ("xxxx@xxxx.com", "5.1.1"),
    # Action: failed with a 4.x.x status is still final (RFC 3464 2.3.3).
    "mail-parser__mail_malformed_2": ("abh@netpar.com.br", "4.2.2"),
    # Classic Exim bounce without a report part: X-Failed-Recipients.
    "set-of-emails__lhost-exim-01.eml": ("kijitora@example.ed.jp", ""),
}
CORPUS_NOT_FAILED = [
    "deltachat-core-rust__dsn_relayed.eml",  # Action: relayed
    "deltachat-core-rust__ms_exchange_report_disposition_notification.eml",  # read receipt
    "discourse__auto_reply.eml", "set-of-emails__rfc3834-01.eml",
    "set-of-emails__rfc3834-02.eml", "set-of-emails__rfc3834-03.eml",
    "flanker__broken-mime.eml", "php-mime-mail-parser__issue212",
]


def corpus_message(name: str):
    if not AUTOREPLY_BOUNCE.is_dir():
        pytest.skip("the shared corpus is not present")
    return BytesParser(policy=policy.default).parsebytes((AUTOREPLY_BOUNCE / name).read_bytes())


@pytest.mark.parametrize("name", sorted(CORPUS_FAILED))
def test_corpus_failure_reports_are_read(name):
    [failure] = failed_recipients(corpus_message(name))
    assert (failure.recipient, failure.status) == CORPUS_FAILED[name]


@pytest.mark.parametrize("name", CORPUS_NOT_FAILED)
def test_corpus_mail_that_reports_no_failure(name):
    assert failed_recipients(corpus_message(name)) == []


# --- end to end ------------------------------------------------------------------------------


def test_bounce_over_smtp_marks_the_grant_failed_and_tells_the_sender(service):
    add_jane()
    service.send(share_message(recipients=[SMITH]))
    received = service.sink.wait_for(2, timeout=15)
    service.drain()
    [link] = [m for m in received if m.rcpt_tos == [SMITH]]
    assert VERP.fullmatch(link.mail_from)
    [receipt] = [m for m in received if m.rcpt_tos == [MEMBER]]
    assert receipt.mail_from == "mailbridge@portal.example"

    # The recipient's server bounces it back to the envelope sender, from the null sender.
    service.send((MAIL / "bounce_postfix.eml").read_bytes(), sign=False, sender="",
                 rcpts=[link.mail_from])
    notice = service.sink.wait_for(3, timeout=15)[2]
    assert notice.rcpt_tos == [MEMBER]
    assert notice.message["In-Reply-To"] == receipt.message["Message-ID"]
    assert SMITH in notice.message.get_body(("plain",)).get_content()
    deadline = time.monotonic() + 10
    while Grant.get().delivery != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert Grant.get().delivery == "failed"
    service.drain()
    assert [r.state for r in InboundMessage.select().order_by(InboundMessage.id)] == [
        "done", "done"]
    assert len(service.sink.messages) == 3  # nothing went back to the bouncing server


def test_forged_report_text_never_reaches_the_sender(runtime):
    # A genuine VERP address can be guessed from nothing, but a recipient who received the
    # link knows theirs; the report's words are theirs to choose.
    rt = configured(runtime)
    share = shared(rt)
    row = link_row(share)
    raw = (MAIL / "bounce_postfix.eml").read_bytes()
    forged = re.sub(rb"Diagnostic-Code: [^\n]*",
                    b"Diagnostic-Code: smtp; 550 5.1.1 Your mailbox is suspended, verify at "
                    b"http://evil.example/login now", raw)
    assert forged != raw
    spool.enqueue(rt, forged, channel="smtp", envelope_from="", envelope_to=[row.envelope_from])
    outcome = pipeline.process(rt, spool.claim_next(rt, "test"), forged)
    assert isinstance(outcome, Done)
    body = text_of(notices(rt)[0][1])
    assert "evil.example" not in body and "suspended" not in body
    assert "(status 5.1.1)" in body
