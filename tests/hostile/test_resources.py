"""Attacks on resources and on what the service writes: filling the disk with mail in a
member's name, flooding intake, MIME bombs, headers injected through a subject or recipient
line, file names that try to escape. Each keeps nothing it should not and sends nothing."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage

import pytest

from mailbridge.outbound import outbox
from mailbridge.store import sealed
from mailbridge.store.models import Document, InboundMessage, OutboundMessage, Share
from tests.helpers import MEMBER, add_jane, pdf_bytes, share_message, wire
from tests.hostile.conftest import assert_nothing_happened, send_raw, snapshot


def test_disk_fill_with_unauthenticated_mail_in_a_members_name_keeps_nothing(svc):
    add_jane()
    before = snapshot(svc)
    big = share_message(attachments=[("scan.pdf", pdf_bytes(size=2 * 1024 * 1024))])
    for _ in range(4):
        send_raw(svc, bytes(big), sender=MEMBER, signed=False)
    assert_nothing_happened(svc, before)  # rows stay with their reason; the bytes are gone
    assert {r.state for r in InboundMessage.select()} == {"ignored"}
    assert InboundMessage.select().where(InboundMessage.purged_at.is_null()).count() == 0


def test_flood_from_one_client_is_told_to_come_back_later(service_with):
    running = service_with(MAILBRIDGE_SMTP_MAX_MESSAGES_PER_HOUR_PER_IP="3",
                           MAILBRIDGE_SENDERS_TRUSTED_RELAYS="192.0.2.0/24")
    add_jane()
    refused = 0
    for _ in range(6):
        try:
            send_raw(running, bytes(share_message()), sender=MEMBER, signed=False)
        except smtplib.SMTPSenderRefused as exc:
            assert exc.smtp_code == 451 and exc.smtp_error.startswith(b"4.7.1")
            refused += 1
    assert refused == 3 and InboundMessage.select().count() == 3


def test_flood_under_many_envelope_senders_still_meets_the_per_ip_budget(service_with):
    running = service_with(MAILBRIDGE_SMTP_MAX_MESSAGES_PER_HOUR_PER_IP="2",
                           MAILBRIDGE_SENDERS_TRUSTED_RELAYS="192.0.2.0/24")
    add_jane()
    for n in range(4):
        try:
            send_raw(running, bytes(share_message()), sender=f"bot{n}@spam.example",
                     signed=False)
        except smtplib.SMTPSenderRefused:
            pass
    assert InboundMessage.select().count() == 2


def test_big_message_from_a_stranger_is_refused_and_never_stored(svc):
    add_jane()
    before = snapshot(svc)
    msg = share_message(sender="eve@evil.example",
                        attachments=[("big.pdf", pdf_bytes(size=3 * 1024 * 1024))])
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send_raw(svc, bytes(msg), sender="eve@evil.example", signed=False)
    assert refused.value.smtp_code == 550
    assert_nothing_happened(svc, before)
    assert InboundMessage.select().count() == 0


def nested(depth: int) -> bytes:
    inner = b"Content-Type: application/pdf\r\n\r\n%PDF-1.4\r\n"
    for level in range(depth):
        boundary = f"b{level}".encode()
        inner = (b"Content-Type: multipart/mixed; boundary=" + boundary + b"\r\n\r\n--"
                 + boundary + b"\r\n" + inner + b"\r\n--" + boundary + b"--\r\n")
    return inner


@pytest.mark.parametrize("bomb", ["deep", "wide"])
def test_mime_bomb_creates_nothing_and_the_member_hears_why(svc, bomb):
    add_jane()
    head = wire(share_message(attachments=())).split(b"\r\n\r\n", 1)[0]
    head = b"\r\n".join(line for line in head.split(b"\r\n")
                        if not line.lower().startswith((b"content-", b"mime-")))
    if bomb == "deep":
        body = nested(200)
    else:
        parts = b"".join(b"--w\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(3000))
        body = b"Content-Type: multipart/mixed; boundary=w\r\n\r\n" + parts + b"--w--\r\n"
    before = snapshot(svc)
    send_raw(svc, head + b"\r\nMIME-Version: 1.0\r\n" + body, sender=MEMBER)
    svc.drain()
    assert Share.select().count() == before.shares
    [notice] = svc.sink.messages[before.relayed:]
    assert notice.rcpt_tos == [MEMBER]
    assert InboundMessage.get().state == "rejected"


def test_header_injection_through_an_encoded_subject_stays_in_the_subject(svc):
    add_jane()
    msg = share_message(subject="x")
    del msg["Subject"]
    msg["Subject"] = "=?utf-8?q?Plan=0D=0ABcc:_eve@evil.example=0D=0A?="
    send_raw(svc, bytes(msg), sender=MEMBER)
    svc.drain()
    for received in svc.sink.messages:
        assert "eve@evil.example" not in received.rcpt_tos
        assert received.message["Bcc"] is None
        head = received.raw.split(b"\r\n\r\n", 1)[0]
        assert b"\nBcc:" not in head and b"\r\nBcc:" not in head
    assert {tuple(m.rcpt_tos) for m in svc.sink.messages} == {(MEMBER,),
                                                              ("dr.smith@ortho.example",)}


def test_recipient_line_smuggling_a_header_makes_no_extra_recipient(svc):
    add_jane()
    msg = EmailMessage()
    msg["From"] = f"Jane Doe <{MEMBER}>"
    msg["To"] = "share@portal.example"
    msg["Subject"] = "POC"
    msg["Message-ID"] = "<inject-1@clinic.example>"
    msg.set_content("To: dr.smith@ortho.example\rBcc: eve@evil.example\n\nplease review\n")
    msg.add_attachment(pdf_bytes(), maintype="application", subtype="pdf", filename="p.pdf")
    send_raw(svc, bytes(msg), sender=MEMBER)
    svc.drain()
    assert all("eve@evil.example" not in m.rcpt_tos for m in svc.sink.messages)
    assert not OutboundMessage.select().where(
        OutboundMessage.to_addr.contains("evil")).exists()


@pytest.mark.parametrize("name", ["../../../etc/cron.d/evil.pdf", "..\\..\\boot.ini.pdf",
                                  "/var/lib/mailbridge/master.key.pdf", "con.pdf\x00.exe"])
def test_file_names_cannot_choose_where_documents_are_stored(svc, name):
    add_jane()
    msg = share_message(attachments=[(name, pdf_bytes())])
    send_raw(svc, bytes(msg), sender=MEMBER)
    svc.drain()
    data_dir = svc.runtime.settings.service.data_dir
    for document in Document.select():
        stored = data_dir / "documents" / document.blob_id[:2] / document.blob_id
        assert stored.is_file()
        shown = sealed.document_name(svc.runtime.phi_key, document)
        assert "/" not in shown and "\\" not in shown and "\x00" not in shown
    assert not (data_dir.parent / "etc").exists()
    for row in OutboundMessage.select():  # and no e-mail carries the raw name either
        assert b"../" not in outbox.open_message(svc.runtime, row)
