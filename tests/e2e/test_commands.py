"""Managing a share by reply, end to end over real SMTP and HTTP: replies shaped like real mail
clients act, and every way of faking or misdirecting one changes nothing."""

from __future__ import annotations

import datetime as dt
import re
import secrets
import smtplib
import urllib.error
import urllib.request
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import make_msgid

import pytest

from mailbridge.clock import system_clock
from mailbridge.shares import jobs
from mailbridge.shares.members import add_member
from mailbridge.store import tokens
from mailbridge.store.models import AuditEvent, Grant, Share, WebSession
from tests.conftest import MAIL
from tests.dkim_helpers import sign
from tests.helpers import MEMBER, add_jane, share_message, wire
from tests.portal_helpers import make_account

SMITH = "dr.smith@ortho.example"
COLLEAGUE = "sam.lee@clinic.example"
LINK = re.compile(r"http://portal\.example/s/([A-Za-z0-9_-]{43})")


# --- helpers -----------------------------------------------------------------------------------


def share_and_receipt(service, sender: str = MEMBER, recipient: str = SMITH):
    """Share one document with one recipient; returns (share, reply address, receipt)."""
    before = len(service.sink.messages)
    service.send(share_message(sender=sender, recipients=[recipient]))
    service.sink.wait_for(before + 2, timeout=15)
    service.drain()
    [receipt] = [m for m in service.sink.messages[before:] if m.rcpt_tos == [sender]]
    share = Share.select().order_by(Share.id.desc()).get()
    return share, receipt.message["Reply-To"], receipt


def fixture_reply(name: str, *, to: str, sender: str = MEMBER, receipt=None) -> EmailMessage:
    """A captured client reply, readdressed: our real reply address, the member's From, a
    fresh Message-ID, and threaded under our real receipt. Trace and verdict headers from
    the capture are dropped (a trusted Authentication-Results would prove a foreign From)."""
    msg = BytesParser(policy=policy.default).parsebytes((MAIL / name).read_bytes())
    for header in ("Received", "Authentication-Results", "Return-Path", "DKIM-Signature",
                   "ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results",
                   "To", "From", "Message-ID", "In-Reply-To", "References"):
        del msg[header]
    msg["From"] = f"Staff <{sender}>"
    msg["To"] = f"mailbridge <{to}>"
    msg["Message-ID"] = make_msgid(domain=sender.split("@")[1])
    if receipt is not None:
        msg["In-Reply-To"] = receipt.message["Message-ID"]
        msg["References"] = receipt.message["Message-ID"]
    return msg


def plain_reply(text: str, *, to: str, sender: str = MEMBER, receipt=None) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Staff <{sender}>"
    msg["To"] = to
    msg["Subject"] = "Re: Shared: POC for patient R.T."
    msg["Message-ID"] = make_msgid(domain=sender.split("@")[1])
    if receipt is not None:
        msg["In-Reply-To"] = receipt.message["Message-ID"]
    msg.set_content(text)
    return msg


def new_mail(service, before: int) -> list:
    service.drain()
    return service.sink.messages[before:]


def grants_of(share) -> list[tuple]:
    return [(g.address, g.state, g.token_hash, g.deadline)
            for g in Grant.select().where(Grant.share == share).order_by(Grant.id)]


def answers_to(mail: list, msg: EmailMessage) -> list:
    """Our answers threaded under `msg` (the sender may get other notifications meanwhile)."""
    return [m for m in mail if m.message["In-Reply-To"] == msg["Message-ID"]]


def body(received) -> str:
    return received.message.get_body(("plain",)).get_content()


def recipient_session(service, share, address: str = SMITH) -> str:
    """The recipient has claimed the share and is signed in; returns the session cookie."""
    account = make_account(service.runtime, address)
    now = system_clock()
    Grant.update(state="claimed", account=account, claimed_at=now).where(
        (Grant.share == share) & (Grant.address == address)).execute()
    sid = secrets.token_urlsafe(32)
    WebSession.create(id_hash=tokens.hash_token(sid), account=account, data={},
                      created_at=now, last_seen_at=now)
    return sid


def portal_get(service, path: str, sid: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{service.service.web_port}{path}",
                                     headers={"Cookie": f"mb_session={sid}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


# --- replies that act --------------------------------------------------------------------------


def test_status_reply_gets_a_threaded_report(service):
    add_jane()
    share, reply_to, receipt = share_and_receipt(service)
    msg = fixture_reply("reply_outlook_status.eml", to=reply_to, receipt=receipt)
    before = len(service.sink.messages)
    service.send(msg, rcpts=[reply_to])
    [answer] = answers_to(new_mail(service, before), msg)
    assert answer.rcpt_tos == [MEMBER]
    assert answer.message["In-Reply-To"] == msg["Message-ID"]
    assert answer.message["Reply-To"] == reply_to
    assert answer.message["Auto-Submitted"] == "auto-replied"
    report = body(answer)
    assert f"{SMITH}: pending" in report and "delivered to relay: yes" in report
    assert "link sent: " in report and "EST" in report  # Jane's clinic is in New York
    assert AuditEvent.get(AuditEvent.kind == "status_sent").actor == MEMBER


def test_revoke_reply_refuses_the_recipients_next_request(service):
    add_jane()
    share, reply_to, receipt = share_and_receipt(service)
    sid = recipient_session(service, share)
    document = share.documents.get()
    assert portal_get(service, f"/documents/{document.id}/download", sid) == 200
    before = len(service.sink.messages)
    msg = fixture_reply("reply_gmail_revoke.eml", to=reply_to, receipt=receipt)
    service.send(msg, rcpts=[reply_to])
    mail = new_mail(service, before)
    assert portal_get(service, f"/documents/{document.id}/download", sid) == 404
    assert portal_get(service, f"/documents/{document.id}", sid) == 404
    assert Grant.get().state == "revoked"
    [answer] = answers_to(mail, msg)
    assert answer.rcpt_tos == [MEMBER]
    assert "Access withdrawn from 1 recipient" in body(answer)
    [notice] = [m for m in mail if m.rcpt_tos == [SMITH]]
    assert "has withdrawn access" in body(notice) and "plan-of-care" not in str(notice.raw)


def test_resend_reply_after_the_link_lapsed_sends_a_new_working_link(service):
    add_jane()
    share, reply_to, receipt = share_and_receipt(service)
    [first_link] = [m for m in service.sink.messages if m.rcpt_tos == [SMITH]]
    old_token = LINK.search(body(first_link)).group(1)
    Grant.update(deadline=system_clock() - dt.timedelta(seconds=1)).execute()
    assert jobs.expire_grants(service.runtime) == 1  # the link lapsed
    before = len(service.sink.messages)
    msg = fixture_reply("reply_outlook_original_message_resend.eml", to=reply_to,
                        receipt=receipt)
    service.send(msg, rcpts=[reply_to])
    mail = new_mail(service, before)
    [link] = [m for m in mail if m.rcpt_tos == [SMITH]]
    token = LINK.search(body(link)).group(1)
    grant = Grant.get()
    assert grant.state == "pending" and grant.token_hash == tokens.hash_token(token)
    assert token != old_token and grant.deadline > system_clock()
    [answer] = answers_to(mail, msg)
    assert "New links sent to 1 recipient" in body(answer)


@pytest.mark.parametrize("fixture, command", [
    ("reply_apple_mail_revoke_address.eml", "revoke"),
    ("reply_german_outlook_revoke.eml", "revoke"),
    ("reply_html_only_revoke.eml", "revoke"),
    ("reply_ios_extend.eml", "extend"),
    ("reply_thunderbird_help.eml", "help"),
    ("reply_top_posted_with_signature.eml", "status"),
])
def test_replies_from_each_mail_client_run_their_command(service, fixture, command):
    add_jane()
    share, reply_to, receipt = share_and_receipt(service)
    msg = fixture_reply(fixture, to=reply_to, receipt=receipt)
    first_line = msg.get_body(("plain", "html")).get_content().lstrip().splitlines()[0]
    before = len(service.sink.messages)
    service.send(msg, rcpts=[reply_to])
    answers = answers_to(new_mail(service, before), msg)
    assert len(answers) == 1, first_line
    event = AuditEvent.get(AuditEvent.kind == "reply_command")
    assert event.detail["command"] == command


# --- the spoofing matrix: nothing changes ------------------------------------------------------


def send_raw(service, raw: bytes, envelope_from: str, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=30) as smtp:
        smtp.sendmail(envelope_from, [rcpt], raw)


class Scene:
    """Jane's share (the target) and Sam's share, both with their receipts."""

    def __init__(self, service) -> None:
        add_jane()
        add_member(COLLEAGUE, "Sam Lee", "Riverside PT", system_clock())
        self.share, self.reply_to, self.receipt = share_and_receipt(service)
        self.their_share, self.their_reply_to, _ = share_and_receipt(service, sender=COLLEAGUE)


def wrong_sender(service, scene):
    service.send(plain_reply("revoke", to=scene.reply_to, sender=COLLEAGUE,
                             receipt=scene.receipt), rcpts=[scene.reply_to])
    return COLLEAGUE


def unsigned(service, scene):
    service.send(plain_reply("revoke", to=scene.reply_to, receipt=scene.receipt), sign=False,
                 rcpts=[scene.reply_to])


def forged_authentication_results(service, scene):
    msg = plain_reply("revoke", to=scene.reply_to, receipt=scene.receipt)
    msg["Authentication-Results"] = ("mx.attacker.example; dkim=pass header.d=clinic.example; "
                                     "dmarc=pass header.from=clinic.example")
    service.send(msg, sign=False, rcpts=[scene.reply_to])


def dkim_with_length_tag(service, scene):
    # The member signed an empty reply with l=0; anyone on the path may append a body, and
    # dkimpy still verifies it: the appended "revoke" would be the first line.
    msg = plain_reply("", to=scene.reply_to, receipt=scene.receipt)
    raw = sign(wire(msg), "clinic.example", "mb2024", service.keyring.private_key, length=True)
    assert re.search(rb"\bl=0\b", raw)
    send_raw(service, raw + b"revoke\r\n", MEMBER, scene.reply_to)


def key_of_another_share(service, scene):
    service.send(plain_reply("revoke", to=scene.their_reply_to), rcpts=[scene.their_reply_to])
    return MEMBER


def forwarded_receipt_by_member(service, scene):
    msg = plain_reply("revoke\n\n---------- Forwarded message ---------\n"
                      f"From: mailbridge <mailbridge@portal.example>\n\n{body(scene.receipt)}",
                      to=scene.reply_to, sender=COLLEAGUE)
    msg.replace_header("Subject", "Fwd: Shared: POC for patient R.T.")
    service.send(msg, rcpts=[scene.reply_to])
    return COLLEAGUE


def forwarded_receipt_by_outsider(service, scene):
    msg = plain_reply(f"revoke\n\n{body(scene.receipt)}", to=scene.reply_to, sender=SMITH)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send_raw(service, wire(msg), SMITH, scene.reply_to)
    assert refused.value.smtp_code == 550


def revoke_only_quoted(service, scene):
    service.send(fixture_reply("reply_quoted_revoke_only.eml", to=scene.reply_to,
                               receipt=scene.receipt), rcpts=[scene.reply_to])
    return MEMBER  # a genuine reply without a command: the command list, nothing else


def out_of_office(service, scene):
    msg = fixture_reply("auto_reply_ooo.eml", to=scene.reply_to, receipt=scene.receipt)
    msg.replace_header("Auto-Submitted", "auto-replied")
    service.send(msg, rcpts=[scene.reply_to])


@pytest.mark.parametrize("attempt", [
    wrong_sender, unsigned, forged_authentication_results, dkim_with_length_tag,
    key_of_another_share, forwarded_receipt_by_member, forwarded_receipt_by_outsider,
    revoke_only_quoted, out_of_office], ids=lambda f: f.__name__)
def test_spoofing_matrix_changes_nothing(service, attempt):
    scene = Scene(service)
    grants = grants_of(scene.share) + grants_of(scene.their_share)
    before = len(service.sink.messages)
    told = attempt(service, scene)
    mail = new_mail(service, before)
    assert grants_of(scene.share) + grants_of(scene.their_share) == grants
    assert AuditEvent.select().where(AuditEvent.kind.in_(
        ("grant_revoked", "share_revoked", "links_resent", "deadline_extended"))).count() == 0
    if told is None:
        assert mail == [], [m.message["Subject"] for m in mail]
    else:
        [notice] = mail
        assert notice.rcpt_tos == [told]
        assert notice.message["Auto-Submitted"] == "auto-replied"
