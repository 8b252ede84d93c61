"""Documents sent back (shares/send_back.py): intake's type and size rules, encryption at rest,
the sender's e-mail threaded under the original receipt with a console link or a portal link,
the audit trail on the original share, and nothing stored when it is refused."""

from __future__ import annotations

import dataclasses
import re
from email import policy
from email.parser import BytesParser

from mailbridge.outbound import outbox
from mailbridge.shares import records, send_back
from mailbridge.store import tokens
from mailbridge.store.blobs import read_all
from mailbridge.store.models import (
    AuditEvent,
    Document,
    Grant,
    OutboundMessage,
    SentBack,
    StaffAccount,
)
from mailbridge.store.states import Audit, GrantState
from tests.helpers import MEMBER, one_page_pdf
from tests.portal_helpers import claim, make_account, make_share, portal_runtime

SMITH = "dr.smith@ortho.example"
RECEIPT_ID = "<receipt-1@reply.portal.example>"


def _setup(runtime, *, console: bool):
    rt = portal_runtime(runtime)
    share, _ = make_share(rt, title="POC for R.T.")
    share.receipt_message_id = RECEIPT_ID
    share.save()
    account = make_account(rt, SMITH)
    grant = claim(rt, share, SMITH, account)
    if console:
        now = rt.clock()
        StaffAccount.create(member=share.sender, password_hash="x", created_at=now,
                            verified_at=now)
    return rt, share, grant


def _files(rt, *pairs):
    return send_back.check_files(list(pairs), rt.settings.limits, 20)


def _sent_mail(rt):
    row = OutboundMessage.get(OutboundMessage.kind == "documents_returned")
    return row, BytesParser(policy=policy.default).parsebytes(outbox.open_message(rt, row))


def _blob_files(rt) -> set:
    return {p for p in rt.settings.documents_dir.rglob("*") if p.is_file()}


def test_signed_form_goes_to_the_console_threaded_under_the_receipt(runtime):
    rt, share, grant = _setup(runtime, console=True)
    signed = one_page_pdf("Signed by Dr Smith")
    documents = _files(rt, ("signed plan.pdf", signed))
    result = send_back.send_back(rt, grant, documents, "Signed, see page 2.", ip="192.0.2.7")

    assert isinstance(result, SentBack) and result.via == "console"
    [stored] = Document.select().where(Document.share == result.share_id)
    assert read_all(rt.documents, stored.blob_id, bytes(stored.blob_key)) == signed
    # At rest the file is ciphertext: the PDF's own text is nowhere in the blob.
    [path] = [p for p in _blob_files(rt) if stored.blob_id in p.name]
    assert b"Signed by Dr Smith" not in path.read_bytes()
    assert not Grant.select().where(Grant.share == result.share_id).exists()

    row, mail = _sent_mail(rt)
    assert row.to_addr == MEMBER
    assert mail["In-Reply-To"] == RECEIPT_ID and mail["References"] == RECEIPT_ID
    assert mail["Subject"].startswith("Re: ")
    body = mail.get_body(("plain",)).get_content()
    assert f"{SMITH} sent 1 document back" in body
    assert "signed plan.pdf (PDF," in body and "Signed, see page 2." in body
    assert f"http://portal.example/staff/returns/{result.id}" in body
    assert "/s/" not in body

    event = AuditEvent.get(AuditEvent.kind == Audit.DOCUMENTS_RETURNED)
    assert (event.share_id, event.grant_id, event.actor) == (share.id, grant.id, SMITH)
    assert event.detail["via"] == "console" and event.ip == "192.0.2.7"
    assert "signed plan" not in str(event.detail)  # file names are PHI: not in the detail


def test_member_without_a_console_account_gets_a_portal_link_to_their_own_address(runtime):
    rt, share, grant = _setup(runtime, console=False)
    result = send_back.send_back(rt, grant, _files(rt, ("consent.pdf", one_page_pdf("ok"))))

    assert result.via == "portal"
    [own] = Grant.select().where(Grant.share == result.share_id)
    assert own.address == MEMBER and own.state == GrantState.PENDING
    _, mail = _sent_mail(rt)
    body = mail.get_body(("plain",)).get_content()
    token = re.search(r"http://portal\.example/s/([A-Za-z0-9_-]+)", body).group(1)
    assert tokens.hash_token(token) == own.token_hash
    assert f"works only for {MEMBER}" in body


def test_the_exchange_shows_in_the_original_shares_audit_trail(runtime):
    rt, share, grant = _setup(runtime, console=False)
    result = send_back.send_back(rt, grant, _files(rt, ("consent.pdf", one_page_pdf("ok"))))
    kinds = [r["kind"] for r in records.rows(rt, records.Selection(share_id=share.id))]
    assert Audit.DOCUMENTS_RETURNED in kinds
    # The grant made for the member's own address is on the returned documents' share, and
    # still part of this share's trail.
    assert kinds.count(Audit.GRANT_CREATED) == 1
    assert records.count(records.Selection(share_id=result.share_id)) == 1


def test_wrong_type_and_oversize_are_refused_by_content_not_name(runtime):
    rt, _share, _grant = _setup(runtime, console=True)
    exe = _files(rt, ("form.pdf", b"MZ\x90\x00\x03" + bytes(range(256)) * 4))
    assert isinstance(exe, send_back.Refused) and exe.reason == "disallowed_type"
    assert "“form.pdf” is not a type that can be sent" in exe.message and "PDF" in exe.message

    small = dataclasses.replace(rt.settings.limits, max_file_bytes=1000, max_total_bytes=1500)
    big = send_back.check_files([("scan.pdf", one_page_pdf("x") + b" " * 2000)], small, 20)
    assert big.reason == "too_large"
    assert big.message == "“scan.pdf” is larger than the limit of 1 KB per file."
    pdf = one_page_pdf("x")
    pdf += b" " * (800 - len(pdf))  # two of them: 1600 bytes, over the total of 1500
    total = send_back.check_files([("a.pdf", pdf), ("b.pdf", pdf)], small, 20)
    assert total.reason == "too_large_total"
    assert send_back.check_files([("", b"")], small, 20).reason == "no_files"
    many = send_back.check_files([("a.pdf", pdf)] * 3, small, 2)
    assert many.reason == "too_many_files" and "at most 2" in many.message


def test_a_revoked_grant_stores_nothing(runtime):
    rt, share, grant = _setup(runtime, console=True)
    documents = _files(rt, ("signed.pdf", one_page_pdf("signed")))
    before = _blob_files(rt)
    Grant.update(state=GrantState.REVOKED).where(Grant.id == grant.id).execute()

    result = send_back.send_back(rt, grant, documents)

    assert isinstance(result, send_back.Refused) and result.reason == "share_ended"
    assert _blob_files(rt) == before  # the encrypted file was deleted again
    assert not SentBack.select().exists()
    assert not OutboundMessage.select().where(OutboundMessage.kind == "documents_returned").exists()
    refused = AuditEvent.get(AuditEvent.kind == Audit.RETURN_REFUSED)
    assert refused.share_id == share.id and refused.detail == {"reason": "share_ended"}


def test_a_disabled_sender_or_a_purged_share_refuses(runtime):
    rt, share, grant = _setup(runtime, console=True)
    assert send_back.refusal(grant) is None
    share.sender.active = False
    share.sender.save()
    assert send_back.refusal(Grant.get_by_id(grant.id)).reason == "sender_inactive"
    share.sender.active = True
    share.sender.save()
    share.purged_at = rt.clock()
    share.save()
    assert send_back.refusal(Grant.get_by_id(grant.id)).reason == "share_purged"


def test_the_members_own_link_gets_no_reminder_and_no_expiry_notice(runtime):
    from mailbridge.shares import jobs

    rt, share, grant = _setup(runtime, console=False)
    result = send_back.send_back(rt, grant, _files(rt, ("consent.pdf", one_page_pdf("ok"))))
    [own] = Grant.select().where(Grant.share == result.share_id)
    hours = (own.deadline - own.created_at).total_seconds() / 3600
    rt.clock.advance(hours=hours - 1)  # inside the reminder window
    assert jobs.remind_grants(rt) == 0
    rt.clock.advance(hours=2)
    assert jobs.expire_grants(rt) == 1
    assert jobs.report_expired(rt) == 1  # reported (and audited) ...
    kinds = {row.kind for row in OutboundMessage.select()}
    assert kinds == {"documents_returned"}  # ... but nobody e-mailed about it
    assert Grant.get_by_id(own.id).expiry_reported_at is not None


def test_the_status_report_says_the_recipient_sent_documents_back(runtime):
    from mailbridge.shares import status

    rt, share, grant = _setup(runtime, console=True)
    send_back.send_back(rt, grant, _files(rt, ("signed.pdf", one_page_pdf("ok"))))
    [recipient] = status.share_status(rt, share).recipients
    assert ("sent documents back", "Sat 28 Nov 2026, 07:00 EST") in recipient.lines
