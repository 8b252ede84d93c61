"""Notices to members about one of their shares that people cause, not jobs: a clinic admin
acted on it in the staff console, a recipient asks for a new link. Also what every member
notice needs to name its share and thread under the share's receipt (`share_ref`)."""

from __future__ import annotations

import datetime as dt
from email import policy
from email.parser import BytesParser

from cryptography.exceptions import InvalidTag

from mailbridge.clock import local_text
from mailbridge.outbound import compose, outbox
from mailbridge.runtime import Runtime
from mailbridge.store import audit, sealed
from mailbridge.store.models import AuditEvent, Grant, Member, OutboundMessage, Share
from mailbridge.store.states import Audit, GrantState, Mail, grant_state

# A recipient may ask for a new link once per grant in this window; more presses are answered
# the same way but e-mail nobody (the sender is not to be flooded).
RESEND_REQUEST_WINDOW = dt.timedelta(hours=12)


def share_ref(runtime: Runtime, share: Share) -> compose.ShareRef:
    """The share as a member notice names it: title, when it was shared, to whom; and the
    receipt's subject and Message-ID to thread under."""
    title = sealed.share_title(runtime.phi_key, share)
    recipients = tuple(g.address for g in Grant.select(Grant.address)
                       .where(Grant.share == share).order_by(Grant.id))
    return compose.ShareRef(title=title,
                            shared_text=local_text(share.created_at, share.clinic.timezone),
                            recipients=recipients,
                            receipt_subject=_receipt_subject(runtime, share, title),
                            receipt_message_id=share.receipt_message_id or "")


def _receipt_subject(runtime: Runtime, share: Share, title: str) -> str:
    """The subject the receipt really went out with (templates can be replaced), read from its
    sealed outbox row; if that row is gone, what the shipped template writes."""
    row = (OutboundMessage.select()
           .where((OutboundMessage.share == share) & (OutboundMessage.kind == Mail.RECEIPT))
           .order_by(OutboundMessage.id).first())
    if row is not None:
        try:
            raw = outbox.open_message(runtime, row)
            subject = BytesParser(policy=policy.default).parsebytes(raw, headersonly=True)
            if subject["Subject"]:
                return str(subject["Subject"])
        except (InvalidTag, ValueError):
            pass
    return compose.receipt_subject(title)


def colleague_acted(runtime: Runtime, share: Share, actor: Member, action: str,
                    summary: str, lines: tuple[str, ...]) -> bool:
    """Tell the sender that a clinic admin acted on their share (in the caller's transaction).
    False when the actor is the sender: nobody needs telling."""
    sender = share.sender
    if actor.id == sender.id:
        return False
    message = compose.share_notice_email(
        runtime.settings, to=sender.email, template="colleague_acted.txt",
        values=dict(sender_name=sender.name, actor_name=actor.name, actor=actor.email,
                    action=action, summary=summary, lines=list(lines), share_id=share.id),
        about=share_ref(runtime, share), now=runtime.clock())
    outbox.enqueue(runtime, message, kind=Mail.NOTICE, to_addr=sender.email, share=share)
    return True


def request_resend(runtime: Runtime, grant: Grant, *, ip: str, user_agent: str) -> bool:
    """A recipient on an expired link's page asks for a new one: the sender gets one notice,
    threaded under the receipt, naming the share and the recipient and how to resend. At most
    one per grant per RESEND_REQUEST_WINDOW; every press is audited. True if e-mailed."""
    now = runtime.clock()
    if grant_state(grant.state, grant.deadline, now) != GrantState.EXPIRED:
        return False
    share = grant.share
    with runtime.db.atomic():
        recent = (AuditEvent.select()
                  .where((AuditEvent.grant == grant) & (AuditEvent.kind == Audit.RESEND_REQUESTED)
                         & (AuditEvent.at > now - RESEND_REQUEST_WINDOW)))
        notify = not any(event.detail.get("notified") for event in recent)
        if notify:
            sender = share.sender
            message = compose.share_notice_email(
                runtime.settings, to=sender.email, template="resend_requested.txt",
                values=dict(sender_name=sender.name, recipient=grant.address,
                            asked_text=local_text(now, share.clinic.timezone),
                            share_id=share.id),
                about=share_ref(runtime, share), reply_to=runtime.settings.outbound.from_,
                now=now)
            outbox.enqueue(runtime, message, kind=Mail.NOTICE, to_addr=sender.email,
                           share=share)
        audit.record(runtime.audit_key, Audit.RESEND_REQUESTED, now, actor=grant.address,
                     share=share, grant=grant, ip=ip, user_agent=user_agent,
                     detail={"notified": notify})
    if notify:
        outbox.notify(runtime)
    return notify
