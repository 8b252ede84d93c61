"""Documents a recipient sends back to a share's sender from the library ("please sign and
return"): checked like intake's attachments, stored encrypted as a share of their own, and the
sender told in an e-mail threaded under the original receipt — in one transaction, audited on
the original share."""

from __future__ import annotations

import datetime as dt
import html
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from mailbridge.clock import local_text
from mailbridge.mail.attachments import Attachment, uploaded_file
from mailbridge.outbound import compose, outbox
from mailbridge.outcomes import Notice, Reject
from mailbridge.runtime import Runtime
from mailbridge.settings import LimitSettings
from mailbridge.shares import clinics, notices
from mailbridge.store import audit, sealed, tokens
from mailbridge.store.blobs import StoredBlob, put_bytes
from mailbridge.store.models import Document, Grant, SentBack, Share, StaffAccount
from mailbridge.store.states import Audit, GrantState, Mail

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 2000
VIA_CONSOLE = "console"  # the sender has a console account: the e-mail links to the console
VIA_PORTAL = "portal"  # no console account: a share to the sender's own address, with its link


@dataclass(frozen=True)
class Refused:
    """Why nothing was sent back: `reason` for the audit trail, `message` for the page."""

    reason: str
    message: str


def mb(n: int) -> str:
    """A size as people read it; small limits (a test or a strict clinic) are not "0 MB"."""
    if n < 1024 * 1024:
        return f"{max(1, round(n / 1024))} KB"
    return compose.megabytes(n)


def check_files(files: Sequence[tuple[str, bytes]], limits: LimitSettings,
                max_files: int) -> list[Attachment] | Refused:
    """The uploaded (name, bytes) pairs as documents under intake's `[limits]`, or why not.
    Empty file inputs (a form sent with no file chosen) are left out."""
    files = [(name, data) for name, data in files if name or data]
    if not files:
        return Refused("no_files", "No file was chosen. Choose at least one file to send.")
    if len(files) > max_files:
        return Refused("too_many_files",
                       f"{len(files)} files were chosen; at most {max_files} can be sent at once.")
    documents: list[Attachment] = []
    total = 0
    for number, (name, data) in enumerate(files, start=1):
        if not data:
            return Refused("empty_file", f"“{name}” is empty.")
        checked = uploaded_file(name, data, limits, number)
        if isinstance(checked, Reject):
            return _refused(checked, name, limits)
        total += len(checked.data)
        if total > limits.max_total_bytes:
            return Refused(Notice.TOO_LARGE_TOTAL, "The files together are larger than the "
                           f"limit of {mb(limits.max_total_bytes)}.")
        documents.append(checked)
    return documents


def _refused(reject: Reject, name: str, limits: LimitSettings) -> Refused:
    shown = reject.details.get("filename", name)
    if reject.code == Notice.TOO_LARGE:
        return Refused(reject.code, f"“{shown}” is larger than the limit of "
                       f"{mb(limits.max_file_bytes)} per file.")
    allowed = ", ".join(kind.upper() for kind in limits.allowed_types)
    return Refused(reject.code, f"“{shown}” is not a type that can be sent. Accepted types "
                   f"(judged by the file's content, not its name): {allowed}.")


def refusal(grant: Grant) -> Refused | None:
    """Why this (claimed) grant may not send documents back now, or None if it may. Revoked
    and removed grants, purged shares and disabled senders end it; an unclaimed grant never
    reaches here (the library shows claimed shares only)."""
    if grant.state != GrantState.CLAIMED or grant.removed_at is not None:
        return Refused("share_ended", "The sender has withdrawn this share, so documents "
                       "can no longer be sent back on it.")
    share = grant.share
    if share.purged_at is not None:
        return Refused("share_purged", "This share's documents were removed under the "
                       "clinic's retention policy; documents can no longer be sent back on it.")
    if not share.sender.active:
        return Refused("sender_inactive", f"{share.sender.name} can no longer receive "
                       "documents here. Please contact the clinic.")
    return None


def record_refusal(runtime: Runtime, grant: Grant, refused: Refused, *, ip: str = "",
                   user_agent: str = "") -> None:
    """Audit an attempt that stored nothing (no file names: they may be PHI)."""
    with runtime.db.atomic():
        audit.record(runtime.audit_key, Audit.RETURN_REFUSED, runtime.clock(),
                     actor=grant.address, share=grant.share_id, grant=grant,
                     account=grant.account_id, ip=ip, user_agent=user_agent,
                     detail={"reason": str(refused.reason)})


def send_back(runtime: Runtime, grant: Grant, documents: list[Attachment], message: str = "",
              *, ip: str = "", user_agent: str = "") -> SentBack | Refused:
    """Store `documents` for the grant's share's sender and tell them, all or nothing."""
    # Encrypt before the transaction (seconds for big files); delete again if it fails.
    blobs = [put_bytes(runtime.documents, d.data) for d in documents]
    try:
        with runtime.db.atomic():
            fresh = Grant.get_or_none(Grant.id == grant.id)
            refused = refusal(fresh) if fresh is not None else Refused("share_ended", "")
            if refused is not None:
                raise _Abort(refused)
            sent_back = _commit(runtime, fresh, documents, blobs,
                                message.strip()[:MAX_MESSAGE_CHARS], ip, user_agent)
    except _Abort as stop:
        _delete(runtime, blobs)
        record_refusal(runtime, grant, stop.refused, ip=ip, user_agent=user_agent)
        return stop.refused
    except BaseException:
        _delete(runtime, blobs)
        raise
    outbox.notify(runtime)
    log.info("share #%d: %d document(s) sent back (#%d, via %s)", sent_back.original_id,
             len(blobs), sent_back.id, sent_back.via)
    return sent_back


class _Abort(Exception):
    def __init__(self, refused: Refused) -> None:
        super().__init__(refused.reason)
        self.refused = refused


def _commit(runtime: Runtime, grant: Grant, documents: list[Attachment],
            blobs: list[StoredBlob], message: str, ip: str, user_agent: str) -> SentBack:
    now = runtime.clock()
    original = grant.share
    member = original.sender
    rules = clinics.policy(original.clinic, runtime.settings)
    title = sealed.share_title(runtime.phi_key, original)
    via = VIA_CONSOLE if StaffAccount.select().where(
        StaffAccount.member == member).exists() else VIA_PORTAL
    # A share of its own, never replied to: its reply key is made up and thrown away.
    share = Share.create(clinic=original.clinic, sender=member, created_at=now,
                         dedupe_key=f"sent-back:{secrets.token_hex(24)}",
                         reply_key_hash=tokens.hash_token(tokens.new_reply_key()))
    note = ("<p>" + html.escape(message).replace("\n", "<br>") + "</p>") if message else ""
    sealed.seal_share(runtime.phi_key, share, f"Sent back by {grant.address}: {title}", note)
    for position, (document, blob) in enumerate(zip(documents, blobs, strict=True)):
        row = Document.create(share=share, position=position, kind=document.kind,
                              content_type=document.content_type, size=blob.size,
                              sha256=blob.sha256, blob_id=blob.blob_id, blob_key=blob.wrapped_key)
        sealed.seal_document_name(runtime.phi_key, row, document.filename)
    sent_back = SentBack.create(share=share, original=original, grant=grant,
                                address=grant.address, via=via, created_at=now)
    audit.record(runtime.audit_key, Audit.DOCUMENTS_RETURNED, now, actor=grant.address,
                 share=original, grant=grant, account=grant.account_id, ip=ip,
                 user_agent=user_agent,
                 detail={"sent_back": sent_back.id, "returned_share": share.id,
                         "documents": len(blobs), "via": via, "message": bool(message)})
    own_grant, deadline_text = None, ""
    in_console = console_url(runtime.settings.service.base_url, sent_back.id)
    open_url = in_console
    if via == VIA_PORTAL:
        token = tokens.new_link_token()
        deadline = now + dt.timedelta(hours=rules.claim_hours)
        deadline_text = local_text(deadline, original.clinic.timezone)
        own_grant = Grant.create(share=share, address=member.email,
                                 token_hash=tokens.hash_token(token), deadline=deadline,
                                 created_at=now)
        audit.record(runtime.audit_key, Audit.GRANT_CREATED, now, actor=grant.address,
                     share=share, grant=own_grant, detail={"sent_back": sent_back.id})
        open_url = compose.link_url(runtime.settings.service.base_url, token)
    email = compose.share_notice_email(
        runtime.settings, to=member.email, template="documents_returned.txt",
        values=dict(sender_name=member.name, recipient=grant.address,
                    sent_text=local_text(now, original.clinic.timezone),
                    files=[(d.filename, d.kind.upper(), mb(len(d.data))) for d in documents],
                    message=message, via=via, open_url=open_url, deadline_text=deadline_text,
                    console_url=in_console),
        about=notices.share_ref(runtime, original), now=now)
    queued = outbox.enqueue(runtime, email, kind=Mail.DOCUMENTS_RETURNED, to_addr=member.email,
                            share=share, grant=own_grant)
    # Whatever threads under the returned documents later files with this e-mail.
    Share.update(receipt_message_id=queued.message_id).where(Share.id == share.id).execute()
    return sent_back


def console_url(base_url: str, sent_back_id: int) -> str:
    return f"{base_url.rstrip('/')}/staff/returns/{sent_back_id}"


def is_sent_back(share_id: int) -> bool:
    """True for a share that holds documents sent back (not one a member made)."""
    return SentBack.select().where(SentBack.share == share_id).exists()


def _delete(runtime: Runtime, blobs: list[StoredBlob]) -> None:
    for blob in blobs:
        try:
            runtime.documents.delete(blob.blob_id)
        except OSError:
            log.warning("could not remove an orphaned document blob %s", blob.blob_id)
