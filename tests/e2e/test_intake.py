"""End to end over real sockets: a member's signed message in, link e-mails and a receipt out
through the sink relay — and nothing at all for mail that must not act."""

from __future__ import annotations

import hashlib
import re

import pytest

from mailbridge.receive import spool
from mailbridge.store import blobs, sealed, tokens
from mailbridge.store.models import (
    AuditEvent,
    Document,
    Grant,
    InboundMessage,
    OutboundMessage,
    Share,
)
from tests.helpers import MEMBER, add_jane, pdf_bytes, share_message

LINK = re.compile(rb"http://portal\.example/s/([A-Za-z0-9_-]{43})")


def all_text(received) -> bytes:
    """Every decoded part of a received message, so checks see through base64/QP."""
    out = [received.raw]
    for part in received.message.walk():
        if not part.is_multipart():
            payload = part.get_payload(decode=True) or b""
            out.append(payload)
    return b"\n".join(out)


def test_signed_member_message_makes_links_and_receipt(service):
    add_jane()
    pdf = pdf_bytes("ROSE-TAYLOR-POC", size=5000)
    msg = share_message(recipients=["Dr.Smith@Ortho.example", "counsel@law.example"],
                        subject="POC Rose Taylor", note="SECRET-NOTE-4411",
                        attachments=[("Rose Taylor POC.pdf", pdf)])
    service.send(msg)
    received = service.sink.wait_for(3, timeout=15)
    service.drain()

    share = Share.get()
    assert sealed.share_title(service.runtime.phi_key, share) == "POC Rose Taylor"
    assert share.sender.email == MEMBER
    [doc] = list(share.documents)
    assert sealed.document_name(service.runtime.phi_key, doc) == "Rose Taylor POC.pdf"
    assert doc.kind == "pdf"
    # Encrypted at rest, and what comes back out is byte-identical.
    assert blobs.read_all(service.runtime.documents, doc.blob_id, bytes(doc.blob_key)) == pdf
    assert doc.sha256 == hashlib.sha256(pdf).hexdigest()
    assert all(b"ROSE-TAYLOR-POC" not in p.read_bytes()
               for p in service.runtime.settings.documents_dir.rglob("*") if p.is_file())

    grants = {g.address: g for g in share.grants}
    assert set(grants) == {"dr.smith@ortho.example", "counsel@law.example"}
    links = [r for r in received if r.message["To"] and "reply+" not in str(r.message)
             and r.rcpt_tos[0] in grants]
    assert sorted(r.rcpt_tos[0] for r in links) == sorted(grants)
    for r in links:
        text = all_text(r)
        # No PHI in the link e-mail: no subject, no filename, no note; nobody else's address.
        for secret in (b"Rose Taylor", b"SECRET-NOTE-4411", b"POC"):
            assert secret not in text
        others = set(grants) - {r.rcpt_tos[0]}
        assert all(o.encode() not in text for o in others)
        assert r.message["Auto-Submitted"] == "auto-generated"
        token = LINK.search(text).group(1).decode()
        grant = grants[r.rcpt_tos[0]]
        assert grant.token_hash == tokens.hash_token(token) and token not in grant.token_hash
        assert grant.state == "pending"
        assert Grant.get_by_id(grant.id).delivery == "sent"

    [receipt] = [r for r in received if r.rcpt_tos == [MEMBER]]
    body = all_text(receipt)
    assert b"Rose Taylor POC.pdf" in body and b"dr.smith@ortho.example" in body
    assert re.search(r"reply\+[0-9a-f]{40}@reply\.portal\.example", receipt.message["Reply-To"])
    assert receipt.message["In-Reply-To"] == msg["Message-ID"]
    assert InboundMessage.get().state == "done"
    assert AuditEvent.select().where(AuditEvent.kind == "share_created").count() == 1


def test_same_message_twice_makes_one_share(service):
    add_jane()
    msg = share_message()
    service.send(msg)
    service.sink.wait_for(2, timeout=15)
    service.send(msg)  # e.g. the sender's MTA retried after a lost 250
    service.drain()
    assert Share.select().count() == 1
    assert [r.outcome for r in InboundMessage.select().order_by(InboundMessage.id)] == [
        "share", "repeat"]
    assert len(service.sink.messages) == 2


def test_unauthenticated_member_mail_creates_nothing_and_gets_no_reply(service):
    add_jane()
    service.send(share_message(), sign=False)
    service.drain()
    assert Share.select().count() == 0 and OutboundMessage.select().count() == 0
    assert service.sink.messages == []
    event = AuditEvent.get(AuditEvent.kind == "sender_unauthenticated")
    assert event.member.email == MEMBER
    row = InboundMessage.get()
    assert row.state == "ignored" and row.purged_at is not None
    # Its raw bytes are gone at once: mail in a member's name cannot fill the disk.
    spool_dir = service.runtime.settings.spool_dir
    assert spool_dir.is_dir() and not [p for p in spool_dir.rglob("*") if p.is_file()]


def test_body_tampered_after_signing_is_not_authenticated(service):
    from tests.dkim_helpers import sign
    from tests.helpers import wire

    add_jane()
    raw = sign(wire(share_message()), "clinic.example", "mb2024", service.keyring.private_key)
    raw = raw.replace(b"dr.smith@ortho.example", b"thief@evil.example")
    import smtplib

    with smtplib.SMTP("127.0.0.1", service.smtp_port) as smtp:
        smtp.sendmail(MEMBER, ["share@portal.example"], raw)
    service.drain()
    assert Share.select().count() == 0 and service.sink.messages == []


def test_unusable_message_gets_one_notice_and_nothing_else(service):
    add_jane()
    msg = share_message(attachments=[])
    service.send(msg)
    [notice] = service.sink.wait_for(1, timeout=15)
    service.drain()
    assert notice.rcpt_tos == [MEMBER]
    assert notice.message["In-Reply-To"] == msg["Message-ID"]
    assert notice.message["Auto-Submitted"] == "auto-replied"
    assert b"attach" in all_text(notice).lower()
    assert Share.select().count() == 0 and Document.select().count() == 0
    assert Grant.select().count() == 0
    assert InboundMessage.get().state == "rejected"
    assert len(service.sink.messages) == 1


@pytest.mark.parametrize("header", ["Auto-Submitted: auto-replied", "Precedence: bulk"])
def test_automated_mail_from_member_gets_nothing(service, header):
    add_jane()
    msg = share_message(attachments=[])  # would otherwise earn a notice
    name, value = header.split(": ")
    msg[name] = value
    service.send(msg)
    service.drain()
    assert service.sink.messages == [] and Share.select().count() == 0
    assert InboundMessage.get().state == "ignored"


def test_plus_addressed_recipient(service):
    add_jane()
    msg = share_message(recipients=[], to="share+dr.smith=ortho.example@portal.example")
    service.send(msg, rcpts=["share+dr.smith=ortho.example@portal.example"])
    service.sink.wait_for(2, timeout=15)
    service.drain()
    assert [g.address for g in Grant.select()] == ["dr.smith@ortho.example"]


def test_unexpected_error_parks_message_and_retry_processes_it(service, monkeypatch):
    from mailbridge.shares import create as share_action

    add_jane()
    original = share_action.create_share

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(share_action, "create_share", broken)
    service.send(share_message())
    service.drain()
    row = InboundMessage.get()
    assert row.state == "failed" and row.reason.startswith("unexpected error (RuntimeError)")
    # The exception's text may quote the message: kept sealed, not in the clear column.
    assert "simulated bug" not in row.reason
    assert "simulated bug" in sealed.inbound_error(service.runtime.phi_key, row)
    assert Share.select().count() == 0 and service.sink.messages == []

    monkeypatch.setattr(share_action, "create_share", original)
    assert spool.requeue(service.runtime, row.id)
    service.sink.wait_for(2, timeout=15)
    service.drain()
    assert InboundMessage.get().state == "done" and Share.select().count() == 1


def test_share_received_over_starttls_is_audited_as_esmtps_and_dkim_still_verifies(
        tmp_path, db_url, sink, keyring):
    import smtplib

    from tests.conftest import SHARING, start_service
    from tests.dkim_helpers import sign
    from tests.helpers import wire
    from tests.tls_helpers import make_certificate

    cert = make_certificate(tmp_path / "tls", "intake")
    running = start_service(tmp_path, db_url, sink, keyring,
                            MAILBRIDGE_SMTP_TLS_CERT_FILE=str(cert.cert),
                            MAILBRIDGE_SMTP_TLS_KEY_FILE=str(cert.key),
                            MAILBRIDGE_SMTP_REQUIRE_TLS="true")
    try:
        add_jane()
        raw = sign(wire(share_message()), "clinic.example", "mb2024", keyring.private_key)
        with smtplib.SMTP("127.0.0.1", running.smtp_port, timeout=30) as smtp:
            smtp.starttls(context=cert.client_context())
            smtp.sendmail(MEMBER, [SHARING], raw)
        sink.wait_for(2, timeout=15)  # the link e-mail and the receipt
        running.drain()
        # The Received header went on top of a signed message: the share exists only
        # because the DKIM signature still verified.
        event = AuditEvent.get(AuditEvent.kind == "share_created")
        assert event.detail["protocol"] == "ESMTPS"
        assert b" with ESMTPS " in spool.read_raw(running.runtime, InboundMessage.get())
    finally:
        running.service.stop(timeout=10)
