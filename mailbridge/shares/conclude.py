"""Ending a message without acting on it: silently (Ignore) or with one notice to the
authenticated member who sent it (Reject)."""

from __future__ import annotations

import logging
from email.message import EmailMessage

from mailbridge.mail import identity
from mailbridge.outbound import compose, outbox
from mailbridge.outcomes import Ignore, Reject
from mailbridge.runtime import Runtime
from mailbridge.shares.reply import original_of
from mailbridge.store import audit, inbound, seen
from mailbridge.store.models import InboundMessage, Member
from mailbridge.store.states import Audit, Inbound, Mail

log = logging.getLogger(__name__)


def ignore(runtime: Runtime, row: InboundMessage, outcome: Ignore,
           member: Member | None = None) -> Ignore:
    """No reply to anyone (RFC 3834, no backscatter). An attempt in a member's name that failed
    authentication is still worth an audit event."""
    now = runtime.clock()
    with runtime.db.atomic():
        if member is not None:
            audit.record(runtime.audit_key, Audit.SENDER_UNAUTHENTICATED, now, actor=member.email,
                         member=member,
                         inbound=row, detail={"reason": outcome.reason})
        inbound.conclude(row, Inbound.IGNORED, "ignore", outcome.reason, now)
    inbound.discard_raw(runtime.db, runtime.spool, row, runtime.clock())
    log.info("inbound #%d ignored: %s", row.id, outcome.reason)
    return outcome


def repeat(runtime: Runtime, row: InboundMessage, member: Member) -> Ignore:
    """The member's message was acted on before: no second action, no second answer."""
    outcome = Ignore("a repeat of a message already acted on")
    now = runtime.clock()
    with runtime.db.atomic():
        audit.record(runtime.audit_key, Audit.MESSAGE_REPEATED, now, actor=member.email,
                     member=member, inbound=row)
        inbound.conclude(row, Inbound.IGNORED, "repeat", outcome.reason, now)
    inbound.discard_raw(runtime.db, runtime.spool, row, runtime.clock())
    log.info("inbound #%d: a repeat of a message already acted on; nothing done", row.id)
    return outcome


def record_forgery(runtime: Runtime, row: InboundMessage, member: Member, count: int) -> None:
    """Authentication-Results claiming our trusted MTA's id where it cannot have written them:
    ignored by `senders`, kept here as evidence."""
    with runtime.db.atomic():
        audit.record(runtime.audit_key, Audit.AUTHENTICATION_FORGED, runtime.clock(),
                     actor=member.email,
                     member=member, inbound=row, detail={"fields": count})
    log.warning("inbound #%d: %d forged Authentication-Results field(s) ignored", row.id, count)


def reject(runtime: Runtime, row: InboundMessage, outcome: Reject, member: Member,
           message: EmailMessage, keys: list[str]) -> Reject:
    now = runtime.clock()
    notice = compose.notice_email(runtime.settings, to=member.email, code=outcome.code,
                                  details=outcome.details,
                                  in_reply_to=identity.message_id(message),
                                  original=original_of(message, member.clinic.timezone))
    with runtime.db.atomic():
        seen.remember(member, keys, row, now)
        outbox.enqueue(runtime, notice, kind=Mail.NOTICE, to_addr=member.email)
        audit.record(runtime.audit_key, Audit.SHARE_REJECTED, now, actor=member.email,
                     member=member, inbound=row,
                     detail={"code": outcome.code})
        inbound.conclude(row, Inbound.REJECTED, outcome.code, outcome.reason, now)
    runtime.wake_dispatcher.set()
    log.info("inbound #%d rejected (%s); notice queued for the member", row.id, outcome.code)
    return outcome
