"""mailbridge behind the real Postfix, with OpenDKIM and OpenDMARC as its milters, configured as
docs/deploy/postfix.md says: a member's message becomes a share, the milters' verdict is what
mailbridge trusts (and a forged one underneath it is not), and replies route.

One Postfix, one pair of milters and one mailbridge (SQLite) serve the whole module: what is
tested is the path between the processes, the database engines have their own tests. The
policy service refuses at RCPT inside Postfix's own dialogue; LMTP answers per recipient.
"""

from __future__ import annotations

import shutil
import smtplib
from email.message import EmailMessage
from email.utils import make_msgid

import pytest

from mailbridge.store import sealed
from mailbridge.store.models import AuditEvent, InboundMessage, Share
from tests import milters, postfix
from tests.conftest import SHARING, free_port, start_service
from tests.dkim_helpers import DkimKeyring, sign
from tests.helpers import MEMBER, add_jane, share_message, wire
from tests.smtp_sink import SmtpSink
from tests.stub_dns import StubDns

pytestmark = pytest.mark.slow

SMITH = "dr.smith@ortho.example"
OUTSIDER = "someone@elsewhere.example"
MX_ONLY = "mx2026"  # a selector whose key only the MTA's OpenDKIM can look up


class Mta:
    """The running set-up: `mx` (Postfix), `mb` (mailbridge's RunningService), milters."""

    def __init__(self, mx, mb, dkim, dmarc, mx_only_key) -> None:
        self.mx, self.mb, self.dkim, self.dmarc = mx, mb, dkim, dmarc
        self.mx_only_key = mx_only_key

    def send(self, msg: EmailMessage, *, selector: str | None = "mb2024",
             rcpts=(SHARING,), sender: str = MEMBER) -> None:
        """Through Postfix, from a client on the "internet", and wait until mailbridge has
        the message and has finished with it."""
        raw = wire(msg)
        if selector == "mb2024":
            raw = sign(raw, "clinic.example", selector, self.mb.keyring.private_key)
        elif selector == MX_ONLY:
            raw = sign(raw, "clinic.example", selector, self.mx_only_key)
        mark = self.mx.mark()
        assert self.mx.send(raw, sender, list(rcpts)) == {}
        self.mx.wait_delivered(since=mark)
        self.mb.drain()


@pytest.fixture(scope="module")
def mta(tmp_path_factory, keyring):
    postfix.require(milters=True)
    directory = postfix.service_dir()
    mx_ring = DkimKeyring()
    mx_only_key = mx_ring.add("clinic.example", MX_ONLY, bits=1024)
    mx_keys = {name: ring.dnsfunc(name) for ring, name in [
        (keyring, "mb2024._domainkey.clinic.example"),
        (mx_ring, f"{MX_ONLY}._domainkey.clinic.example")]}
    data = tmp_path_factory.mktemp("mailbridge")
    try:
        with SmtpSink() as sink, \
                StubDns({"_dmarc.clinic.example": "v=DMARC1; p=reject"}) as dns, \
                milters.OpenDkim(directory, mx_keys) as dkim, \
                milters.OpenDmarc(directory, dns) as dmarc:
            mb = start_service(data, f"sqlite:///{data / 'mailbridge.db'}", sink, keyring)
            try:
                add_jane()
                with postfix.PostfixInstance(directory / "postfix",
                                             mailbridge_port=mb.smtp_port,
                                             milters=[dkim.spec, dmarc.spec]) as mx:
                    yield Mta(mx, mb, dkim, dmarc, mx_only_key)
            finally:
                mb.service.stop(timeout=10)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def shares_titled(mta, title: str) -> list[Share]:
    key = mta.mb.runtime.phi_key
    return [s for s in Share.select() if sealed.share_title(key, s) == title]


def last_row() -> InboundMessage:
    return InboundMessage.select().order_by(InboundMessage.id.desc()).get()


def test_a_members_signed_message_through_postfix_becomes_a_share(mta):
    msg = share_message(recipients=[SMITH], subject="Through the MX")
    before = len(mta.mb.sink.messages)
    mta.send(msg)
    [share] = shares_titled(mta, "Through the MX")
    assert [g.address for g in share.grants] == [SMITH]
    row = last_row()
    assert row.state == "done" and row.client_ip == "127.0.0.1"  # Postfix was the client
    new = mta.mb.sink.messages[before:]
    assert sorted(m.rcpt_tos[0] for m in new) == sorted([SMITH, MEMBER])  # link and receipt
    assert mta.mx.queue_ids() == []


def test_the_milters_verdict_is_what_mailbridge_trusts(mta):
    """Signed with a key only the MTA's OpenDKIM can look up: mailbridge's own check cannot
    verify it, so a share proves the Authentication-Results of OpenDKIM/OpenDMARC counted."""
    assert mta.mb.keyring.dnsfunc(f"{MX_ONLY}._domainkey.clinic.example") is None
    mta.send(share_message(subject="Vouched for by the MX"), selector=MX_ONLY)
    assert len(shares_titled(mta, "Vouched for by the MX")) == 1

    # The same kind of message straight to mailbridge, without the MX's verdict: nothing.
    direct = sign(wire(share_message(subject="Straight to mailbridge")), "clinic.example",
                  MX_ONLY, mta.mx_only_key)
    with smtplib.SMTP("127.0.0.1", mta.mb.smtp_port, timeout=30) as smtp:
        smtp.sendmail(MEMBER, [SHARING], direct)
    mta.mb.drain()
    assert shares_titled(mta, "Straight to mailbridge") == []


@pytest.mark.parametrize("forged, kept", [
    ("mx.portal.example; dkim=pass header.d=clinic.example header.s=mb2024", False),
    ("mx.portal.example; dmarc=pass header.from=clinic.example", True),
], ids=["dkim-pass-stripped-by-opendkim", "dmarc-pass-kept-by-the-milters"])
def test_a_forged_pass_under_the_mtas_own_verdict_makes_nothing(mta, forged, kept):
    """An unsigned message carrying a pass for our MTA's authserv-id, written by the sender.
    OpenDKIM removes a forged DKIM result claiming its id; a forged DMARC result passes both
    milters, but their own verdict (dkim=none, dmarc=fail) sits on top, only that block
    counts, and the forgery is audited."""
    msg = share_message(subject=f"Forged verdict {kept}")
    msg["Authentication-Results"] = forged
    forged_before = AuditEvent.select().where(AuditEvent.kind == "authentication_forged").count()
    mta.send(msg, selector=None)
    assert shares_titled(mta, f"Forged verdict {kept}") == []
    row = last_row()
    assert row.outcome == "ignore" and "not authenticated" in row.reason
    forged_after = AuditEvent.select().where(AuditEvent.kind == "authentication_forged").count()
    assert forged_after == forged_before + (1 if kept else 0)


def test_a_reply_command_to_the_reply_domain_routes_through_postfix(mta):
    before = len(mta.mb.sink.messages)
    mta.send(share_message(recipients=[SMITH], subject="Reply routing"))
    [receipt] = [m for m in mta.mb.sink.messages[before:] if m.rcpt_tos == [MEMBER]]
    reply_to = receipt.message["Reply-To"]
    assert reply_to.endswith("@reply.portal.example")

    reply = EmailMessage()
    reply["From"] = f"Jane Doe <{MEMBER}>"
    reply["To"] = reply_to
    reply["Subject"] = "Re: Shared"
    reply["Message-ID"] = make_msgid(domain="clinic.example")
    reply["In-Reply-To"] = receipt.message["Message-ID"]
    reply["Date"] = "Sat, 28 Nov 2026 10:00:00 -0500"  # OpenDMARC refuses mail without one
    reply.set_content("status\n")
    before = len(mta.mb.sink.messages)
    mta.send(reply, rcpts=[reply_to])
    [answer] = [m for m in mta.mb.sink.messages[before:]
                if m.message["In-Reply-To"] == reply["Message-ID"]]
    assert answer.rcpt_tos == [MEMBER]
    assert f"{SMITH}: pending" in answer.message.get_body(("plain",)).get_content()


# --- the policy service and LMTP intake ------------------------------------------------------


def test_postfix_refuses_a_non_member_at_rcpt_and_queues_no_bounce(keyring):
    postfix.require()
    directory = postfix.service_dir()
    policy_port = free_port()
    data = directory / "mailbridge"
    try:
        with SmtpSink() as sink:
            mb = start_service(data, f"sqlite:///{data / 'mailbridge.db'}", sink, keyring,
                               MAILBRIDGE_POLICY_ENABLED="true",
                               MAILBRIDGE_POLICY_HOST="127.0.0.1",
                               MAILBRIDGE_POLICY_PORT=str(policy_port))
            try:
                add_jane()
                with postfix.PostfixInstance(directory / "postfix", policy_port=policy_port,
                                             mailbridge_port=mb.smtp_port) as mx:
                    raw = wire(share_message(sender=OUTSIDER))
                    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                        mx.send(raw, OUTSIDER, [SHARING])
                    code, text = refused.value.recipients[SHARING]
                    assert code // 100 == 5 and b"5.7.1" in text
                    with pytest.raises(smtplib.SMTPRecipientsRefused) as unknown:
                        mx.send(raw, MEMBER, ["nobody@portal.example"])
                    code, text = unknown.value.recipients["nobody@portal.example"]
                    assert code // 100 == 5 and b"5.1.1" in text
                    assert mx.queue_ids() == []  # nothing accepted, so no bounce to send
                    # A member is still let through (DUNNO) and relayed to mailbridge.
                    signed = sign(wire(share_message()), "clinic.example", "mb2024",
                                  keyring.private_key)
                    mark = mx.mark()
                    assert mx.send(signed, MEMBER, [SHARING]) == {}
                    mx.wait_delivered(since=mark)
            finally:
                mb.service.stop(timeout=10)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_postfix_delivers_over_lmtp_and_gets_an_answer_per_recipient(keyring):
    postfix.require()
    directory = postfix.service_dir()
    lmtp_port = free_port()
    data = directory / "mailbridge"
    try:
        with SmtpSink() as sink:
            mb = start_service(data, f"sqlite:///{data / 'mailbridge.db'}", sink, keyring,
                               MAILBRIDGE_LMTP_ENABLED="true", MAILBRIDGE_LMTP_HOST="127.0.0.1",
                               MAILBRIDGE_LMTP_PORT=str(lmtp_port))
            try:
                add_jane()
                with postfix.PostfixInstance(directory / "postfix", transport="lmtp",
                                             mailbridge_port=lmtp_port) as mx:
                    signed = sign(wire(share_message(subject="Over LMTP")), "clinic.example",
                                  "mb2024", keyring.private_key)
                    mark = mx.mark()
                    mx.send(signed, MEMBER, [SHARING, "nobody@portal.example"])
                    # Postfix logs one line per recipient with the LMTP server's own answer.
                    [sent] = mx.wait_log(rf"lmtp\[\d+\]: .*to=<{SHARING}>.* status=",
                                         since=mark)
                    assert "status=sent (250 " in sent
                    [refused] = mx.wait_log(r"lmtp\[\d+\]: .*to=<nobody@portal\.example>.* status=",
                                            since=mark)
                    assert "said: 550 5.1.1" in refused
                    mx.clear_queue()  # the bounce for nobody@ (this test has no policy service)
                    mb.drain()
                    assert Share.select().count() == 1
            finally:
                mb.service.stop(timeout=10)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
