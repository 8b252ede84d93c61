"""Turn an accepted request into a share: documents stored encrypted, one grant (link) per
recipient, a link e-mail each, a receipt to the sender — committed together or not at all."""

from __future__ import annotations

import datetime as dt
import logging
from email.message import EmailMessage

import peewee

from mailbridge.clock import local_text
from mailbridge.mail import identity
from mailbridge.mail.request import ParsedShare
from mailbridge.outbound import compose, outbox
from mailbridge.outcomes import Done
from mailbridge.runtime import Runtime
from mailbridge.shares import clinics
from mailbridge.store import audit, inbound, sealed, seen, tokens
from mailbridge.store.blobs import StoredBlob, put_bytes
from mailbridge.store.models import Document, Grant, InboundMessage, Member, Share
from mailbridge.store.states import Audit, Inbound, Mail

log = logging.getLogger(__name__)


def create_share(runtime: Runtime, row: InboundMessage, raw: bytes, member: Member,
                 message: EmailMessage, request: ParsedShare, keys: list[str]) -> Done:
    key = identity.share_dedupe_key(raw, message)
    existing = Share.get_or_none(Share.dedupe_key == key)
    if existing:
        return _duplicate(runtime, row, existing)

    # Encrypting can take seconds for large files: do it before the transaction so the write
    # lock is held only for the inserts. Blobs of a failed transaction are deleted again.
    blobs = [put_bytes(runtime.documents, a.data) for a in request.attachments]
    try:
        share = _commit(runtime, row, member, message, request, blobs, key, keys)
    except peewee.IntegrityError:
        delete_blobs(runtime, blobs)
        existing = Share.get_or_none(Share.dedupe_key == key)
        if existing is not None:
            return _duplicate(runtime, row, existing)
        raise  # a copy of the message acted on at this moment: the worker tries again
    except BaseException:
        delete_blobs(runtime, blobs)
        raise
    runtime.wake_dispatcher.set()
    runtime.metrics.share_created()
    log.info("inbound #%d: share #%d created with %d document(s) for %d recipient(s)",
             row.id, share.id, len(blobs), len(request.recipients))
    return Done(share.id, "share created")


def _commit(runtime: Runtime, row: InboundMessage, member: Member, message: EmailMessage,
            request: ParsedShare, blobs: list[StoredBlob], key: str, keys: list[str]) -> Share:
    settings = runtime.settings
    now = runtime.clock()
    clinic = member.clinic
    rules = clinics.policy(clinic, settings)
    deadline = now + dt.timedelta(hours=rules.claim_hours)
    when = local_text(deadline, clinic.timezone)
    reply_key = tokens.new_reply_key()
    # The e-mails are rendered and sealed before the transaction: building MIME is most of
    # the work here, and the write lock (SMTP intake and the dispatcher wait on it) need not
    # be held for it.
    links = []
    for address in request.recipients:
        token = tokens.new_link_token()
        link = compose.link_email(settings, to=address,
                                  link_url=compose.link_url(settings.service.base_url, token),
                                  clinic_name=rules.display_name, sender_name=member.name,
                                  document_count=len(blobs), deadline_text=when,
                                  contact=rules.contact)
        links.append((address, token, outbox.prepare(runtime, link, address)))
    receipt = outbox.prepare(runtime, compose.receipt_email(
        settings, to=member.email, sender_name=member.name, share_title=request.title,
        recipients=list(request.recipients),
        filenames=[a.filename for a in request.attachments], deadline_text=when,
        reply_address=f"reply+{reply_key}@{settings.addresses.reply_domain}",
        in_reply_to=identity.message_id(message), claim_hours=rules.claim_hours), member.email)
    with runtime.db.atomic():
        seen.remember(member, keys, row, now)
        share = Share.create(clinic=clinic, sender=member, inbound=row, created_at=now,
                             dedupe_key=key, reply_key_hash=tokens.hash_token(reply_key))
        sealed.seal_share(runtime.phi_key, share, request.title, request.note_html)
        # The share's events go to the audit chain in one append (one read of its head).
        events = [dict(kind=Audit.SHARE_CREATED, at=now, actor=member.email, share=share,
                       member=member, inbound=row,
                       detail={"documents": len(blobs), "recipients": len(request.recipients),
                               "protocol": row.protocol})]
        for position, (attachment, blob) in enumerate(zip(request.attachments, blobs,
                                                          strict=True)):
            document = Document.create(share=share, position=position, kind=attachment.kind,
                                       content_type=attachment.content_type, size=blob.size,
                                       sha256=blob.sha256, blob_id=blob.blob_id,
                                       blob_key=blob.wrapped_key)
            sealed.seal_document_name(runtime.phi_key, document, attachment.filename)
        for address, token, link in links:
            grant = Grant.create(share=share, address=address,
                                 token_hash=tokens.hash_token(token), deadline=deadline,
                                 created_at=now)
            events.append(dict(kind=Audit.GRANT_CREATED, at=now, actor=member.email,
                               share=share, grant=grant))
            outbox.enqueue(runtime, link, kind=Mail.LINK, to_addr=address, share=share,
                           grant=grant)
        queued = outbox.enqueue(runtime, receipt, kind=Mail.RECEIPT, to_addr=member.email,
                                share=share)
        share.receipt_message_id = queued.message_id
        (Share.update(receipt_message_id=queued.message_id)
         .where(Share.id == share.id).execute())
        inbound.conclude(row, Inbound.DONE, "share", f"share #{share.id}", now)
        # Last: on PostgreSQL the chain head stays locked until the commit, and other
        # workers' shares wait for it.
        audit.record_many(runtime.audit_key, events)
    return share


def _duplicate(runtime: Runtime, row: InboundMessage, existing: Share) -> Done:
    with runtime.db.atomic():
        inbound.conclude(row, Inbound.DONE, "duplicate", f"same message as share #{existing.id}",
                       runtime.clock())
    log.info("inbound #%d is a repeat of share #%d; nothing new created", row.id, existing.id)
    return Done(existing.id, "duplicate of an existing share")


def delete_blobs(runtime: Runtime, blobs: list[StoredBlob]) -> None:
    """Remove documents encrypted for a transaction that did not commit."""
    for blob in blobs:
        try:
            runtime.documents.delete(blob.blob_id)
        except OSError:
            log.warning("could not remove an orphaned document blob %s", blob.blob_id)
