"""E-mails mailbridge sends on its own about a share — the recipient's reminder and the
sender's first-view, expiry and delivery-failure notices — each at most once.

"Once" is a conditional UPDATE of the grant's `*_reported_at` / `reminded_at` / `delivery`
column in the same transaction that queues the e-mail: on several nodes at once, only the
node whose UPDATE changed the row sends.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from email import policy
from email.parser import BytesParser

from cryptography.exceptions import InvalidTag
from peewee import fn

from mailbridge.clock import local_text
from mailbridge.outbound import compose, outbox
from mailbridge.outcomes import Notice
from mailbridge.runtime import Runtime
from mailbridge.shares import clinics
from mailbridge.shares.notices import share_ref
from mailbridge.store import audit, audit_rows, bulk, tokens
from mailbridge.store.models import (
    Clinic,
    Document,
    Grant,
    Member,
    OutboundMessage,
    SentBack,
    Share,
)
from mailbridge.store.states import Audit, Delivery, Mail

MAX_REASON_CHARS = 300


def remind(runtime: Runtime, grant_id: int) -> bool:
    """Queue the one reminder for a pending grant; False if it was reminded already, or is no
    longer pending (claimed, revoked, past its deadline)."""
    return remind_many(runtime, [grant_id]) == 1


def remind_many(runtime: Runtime, grant_ids: Sequence[int]) -> int:
    """`remind` for a batch: the e-mails are composed first, then one transaction marks the
    grants still due (one UPDATE, its guard in the WHERE clause: another node's run marks
    none twice) and queues and audits exactly those. Returns how many were queued."""
    grants = list(Grant.select().where(Grant.id.in_(list(grant_ids))).order_by(Grant.id))
    if not grants:
        return 0
    shares = _shares({g.share_id for g in grants})
    documents = dict(Document.select(Document.share, fn.COUNT(Document.id))
                     .where(Document.share.in_(list(shares))).group_by(Document.share).tuples())
    links = current_links(runtime, grants)
    messages = {}
    for grant in grants:
        share = shares[grant.share_id]
        timezone = share.clinic.timezone
        link, sent_at = links[grant.id]
        rules = clinics.policy(share.clinic, runtime.settings)
        messages[grant.id] = compose.reminder_email(
            runtime.settings, to=grant.address, link_url=link, clinic_name=rules.display_name,
            contact=rules.contact, sender_name=share.sender.name,
            document_count=documents.get(share.id, 0), sent_text=local_text(sent_at, timezone),
            deadline_text=local_text(grant.deadline, timezone), now=runtime.clock())
    now = runtime.clock()
    with runtime.db.atomic():
        marked = bulk.mark_reminded(runtime.db, [g.id for g in grants], now)
        chosen = [g for g in grants if g.id in marked]
        audit.record_each(runtime.audit_key, audit_rows.Template(
            kind=Audit.REMINDER_SENT, at=now, per_event_detail=True),
            [(g.share_id, g.id, {"with_link": links[g.id][0] is not None}) for g in chosen])
        outbox.enqueue_many(runtime, [
            outbox.Queued(messages[g.id], kind=Mail.REMINDER, to_addr=g.address,
                          share=g.share_id, grant=g.id) for g in chosen])
    return len(chosen)


def _shares(share_ids: Iterable[int]) -> dict[int, Share]:
    """Shares with their sender and clinic, in one query."""
    return {share.id: share for share in
            Share.select(Share, Member, Clinic)
            .join(Member, on=(Share.sender == Member.id)).switch(Share)
            .join(Clinic, on=(Share.clinic == Clinic.id))
            .where(Share.id.in_(list(share_ids)))}


def current_link(runtime: Runtime, grant: Grant) -> tuple[str | None, dt.datetime]:
    """The grant's working link and when it was e-mailed. Tokens are stored only as hashes,
    but the link e-mail itself is kept sealed in the outbox: the newest one whose link matches
    the grant's current token hash gives it back. (None, ...) if none does — e.g. the outbox
    row is gone — and the reminder then points to the first e-mail instead."""
    return current_links(runtime, [grant])[grant.id]


def current_links(runtime: Runtime,
                  grants: Sequence[Grant]) -> dict[int, tuple[str | None, dt.datetime]]:
    """`current_link` for a batch of grants, their link e-mails read in one query."""
    rows: dict[int, list[OutboundMessage]] = {}
    for row in (OutboundMessage.select()
                .where((OutboundMessage.grant.in_([g.id for g in grants]))
                       & (OutboundMessage.kind == "link"))
                .order_by(OutboundMessage.id.desc())):
        rows.setdefault(row.grant_id, []).append(row)
    prefix = compose.link_url(runtime.settings.service.base_url, "")
    pattern = re.compile(re.escape(prefix) + r"([A-Za-z0-9_-]{16,128})")
    return {grant.id: _link_of(runtime, grant, rows.get(grant.id, []), pattern)
            for grant in grants}


def _link_of(runtime: Runtime, grant: Grant, rows: list[OutboundMessage],
             pattern: re.Pattern) -> tuple[str | None, dt.datetime]:
    for row in rows:
        try:
            raw = outbox.open_message(runtime, row)
        except (InvalidTag, ValueError):
            continue
        for token in pattern.findall(_plain_text(raw)):
            if tokens.hash_token(token) == grant.token_hash:
                return compose.link_url(runtime.settings.service.base_url, token), row.created_at
    return None, rows[0].created_at if rows else grant.created_at


def first_view(runtime: Runtime, grant: Grant) -> bool:
    """On a recipient's first view or download of a share: tell the sender once, threaded under
    the receipt. Later views cost no write. With `[notifications] first_view` off the grant is
    still marked, so turning it on later does not report old views as new."""
    if grant.first_view_reported_at is not None:
        return False
    now = runtime.clock()
    with runtime.db.atomic():
        changed = (Grant.update(first_view_reported_at=now)
                   .where((Grant.id == grant.id) & Grant.first_view_reported_at.is_null())
                   .execute())
        if not changed or not runtime.settings.notifications.first_view:
            return False
        if SentBack.select().where(SentBack.share == grant.share_id).exists():
            return False  # the member opening documents sent back to them: nobody to tell
        share = Share.get_by_id(grant.share_id)
        sender, timezone = share.sender, share.clinic.timezone
        message = compose.first_view_email(
            runtime.settings, to=sender.email, sender_name=sender.name,
            recipient=grant.address, shared_text=local_text(share.created_at, timezone),
            opened_text=local_text(now, timezone),
            in_reply_to=share.receipt_message_id or None, about=share_ref(runtime, share),
            now=now)
        outbox.enqueue(runtime, message, kind=Mail.FIRST_VIEW, to_addr=sender.email, share=share,
                       grant=grant)
    outbox.notify(runtime)
    return True


def expiry_summary(runtime: Runtime, share_id: int) -> int:
    """One notice to the sender listing the share's expired grants not reported yet; returns
    how many grants it covered (0: nothing new)."""
    return sum(expiry_summaries(runtime, [share_id]).values())


def expiry_summaries(runtime: Runtime, share_ids: Sequence[int]) -> dict[int, int]:
    """`expiry_summary` for a batch of shares in one transaction; returns for each share
    reported how many grants its notice covers. The shares are locked first, in id order
    (PostgreSQL), so two nodes never split one share's grants between two notices."""
    if not share_ids:
        return {}
    now = runtime.clock()
    notify = runtime.settings.notifications.expiry_summary
    with runtime.db.atomic():
        bulk.lock_shares(runtime.db, share_ids)
        reported = bulk.mark_expiry_reported(runtime.db, share_ids, now)
        if not reported:
            return {}
        shares = _shares(reported)
        order = sorted(reported)
        # Nobody to tell when the member's own link to documents sent back to them lapsed.
        returned = {row.share_id for row in SentBack.select(SentBack.share)
                    .where(SentBack.share.in_(order))}
        if notify:
            outbox.enqueue_many(runtime, [
                outbox.Queued(_summary_email(runtime, shares[share_id], reported[share_id], now),
                              kind=Mail.EXPIRY_SUMMARY, to_addr=shares[share_id].sender.email,
                              share=share_id) for share_id in order if share_id not in returned])
        audit.record_each(runtime.audit_key, audit_rows.Template(
            kind=Audit.EXPIRY_REPORTED, at=now, varying=("share",), per_event_detail=True),
            [(share_id, {"recipients": len(reported[share_id]),
                         "notified": notify and share_id not in returned})
             for share_id in order])
    return {share_id: len(addresses) for share_id, addresses in reported.items()}


def _summary_email(runtime: Runtime, share: Share, addresses: list[str], now: dt.datetime):
    sender = share.sender
    return compose.expiry_summary_email(
        runtime.settings, to=sender.email, sender_name=sender.name, addresses=addresses,
        shared_text=local_text(share.created_at, share.clinic.timezone),
        in_reply_to=share.receipt_message_id or None, about=share_ref(runtime, share), now=now)


def refusal_status(reason: str) -> str:
    """The status code in a refusal ("5.1.1", else "550"), "" if none: the only part of a
    remote server's answer we repeat to staff. Its text is chosen by whoever wrote the
    bounce, and a forged bounce to a genuine VERP address must not speak in our name."""
    found = _ENHANCED_STATUS.search(reason) or _BASIC_STATUS.search(reason)
    return found.group(0) if found else ""


_ENHANCED_STATUS = re.compile(r"\b[245]\.\d{1,3}\.\d{1,3}\b")
_BASIC_STATUS = re.compile(r"\b[45]\d\d\b")


def mail_failed(runtime: Runtime, row: OutboundMessage, reason: str) -> bool:
    """The outbox gave up on an e-mail (the dispatcher's `on_failure`): for a link e-mail,
    `link_failed`. Runs in the dispatcher's transaction."""
    if row.kind != "link" or row.grant_id is None:
        return False
    return link_failed(runtime, row.grant_id, event=Audit.LINK_UNDELIVERABLE, reason=reason,
                       detail={"outbound_id": row.id, "attempts": row.attempts})


def link_failed(runtime: Runtime, grant_id: int, *, event: str, reason: str,
                detail: dict) -> bool:
    """A recipient's link e-mail cannot be delivered (relay refused it, or a bounce came back):
    mark the grant, audit `event` (with `reason`, for operators) and queue one notice to the
    sender naming only the status code. True if the grant was newly marked; a grant already
    failed changes nothing and gets no second notice. Runs in the caller's transaction; the
    caller wakes the dispatcher after the commit."""
    changed = (Grant.update(delivery=Delivery.FAILED)
               .where((Grant.id == grant_id) & (Grant.delivery != Delivery.FAILED)).execute())
    if not changed:
        return False
    grant = Grant.get_by_id(grant_id)
    share = grant.share
    sender = share.sender
    now = runtime.clock()
    reason = " ".join(reason.split())[:MAX_REASON_CHARS]
    audit.record(runtime.audit_key, event, now, share=share, grant=grant, member=sender,
                 detail={**detail, "reason": reason})
    if runtime.settings.notifications.delivery_failure:
        notice = compose.notice_email(runtime.settings, to=sender.email,
                                      code=Notice.LINK_UNDELIVERABLE,
                                      details={"address": grant.address,
                                               "status": refusal_status(reason)},
                                      in_reply_to=share.receipt_message_id or None,
                                      about=share_ref(runtime, share), now=now)
        outbox.enqueue(runtime, notice, kind=Mail.NOTICE, to_addr=sender.email, share=share)
    return True


def _plain_text(raw: bytes) -> str:
    # The decoded text part, so a quoted-printable soft break cannot split the link.
    message = BytesParser(policy=policy.default).parsebytes(raw)
    body = message.get_body(("plain",))
    return body.get_content() if body is not None else ""
