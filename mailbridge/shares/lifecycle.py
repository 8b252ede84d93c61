"""Managing a share after it was sent: revoke, resend, extend and the status report. The same
functions serve reply commands and the `mailbridge shares` CLI."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from mailbridge.clock import local_text
from mailbridge.mail.addresses import normalise
from mailbridge.outbound import compose, outbox
from mailbridge.runtime import Runtime
from mailbridge.shares import clinics, status
from mailbridge.store import audit, tokens
from mailbridge.store.models import Grant, Share
from mailbridge.store.states import LIVE, Audit, Delivery, GrantState, Mail, grant_state


class LifecycleError(ValueError):
    """A request that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class Result:
    """What a lifecycle operation did: one summary line, one line per recipient concerned,
    and the addresses whose grant changed."""

    summary: str
    lines: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def text(self) -> str:
        return "\n".join([self.summary, *(f"  - {line}" for line in self.lines)])


def normalise_address(address: str) -> str:
    """As grants store it; text that is no address is kept (lower case), so a garbled one
    matches no recipient rather than, say, all of them."""
    return normalise(address) or address.strip().lower()


def effective_state(grant: Grant, now: dt.datetime) -> GrantState:
    return grant_state(grant.state, grant.deadline, now)


def _grants(share: Share, address: str | None) -> list[Grant]:
    query = Grant.select().where(Grant.share == share).order_by(Grant.id)
    if address is not None:
        query = query.where(Grant.address == normalise_address(address))
    return list(query)


def _not_a_recipient(address: str) -> Result:
    return Result(f"{normalise_address(address)} is not a recipient of this share; "
                  "nothing was changed.")


# --- revoke ----------------------------------------------------------------------------------


def revoke(runtime: Runtime, share: Share, *, address: str | None = None,
           actor: str) -> Result:
    """Withdraw access from every recipient (or one): pending and claimed grants become
    revoked at once, so the portal refuses their next request. Expired grants stay expired.
    Each revoked recipient gets a short notice without PHI (`[notifications]
    recipient_revoked`). Runs in one transaction (nested in the caller's, if any)."""
    grants = _grants(share, address)
    if address is not None and not grants:
        return _not_a_recipient(address)
    settings = runtime.settings
    rules = clinics.policy(share.clinic, settings)
    now = runtime.clock()
    lines, changed = [], []
    with runtime.db.atomic():
        for grant in grants:
            was = effective_state(grant, now)
            # Conditional: a grant claimed or expired meanwhile is still decided correctly.
            done = (Grant.update(state=GrantState.REVOKED, ended_at=now)
                    .where((Grant.id == grant.id)
                           & ((Grant.state == GrantState.CLAIMED)
                              | ((Grant.state == GrantState.PENDING) & (Grant.deadline > now))))
                    .execute()) if was in LIVE else 0
            if not done:
                lines.append(_unchanged_by_revoke(grant, was, share))
                continue
            changed.append(grant.address)
            lines.append(f"{grant.address}: access withdrawn"
                         + (" (had claimed the documents)" if was == GrantState.CLAIMED else
                            " (had not claimed the link yet)"))
            audit.record(runtime.audit_key, Audit.GRANT_REVOKED, now, actor=actor, share=share,
                         grant=grant,
                         detail={"was": was})
            if settings.notifications.recipient_revoked and grant.delivery != Delivery.FAILED:
                notice = compose.recipient_revoked_email(
                    settings, to=grant.address, clinic_name=rules.display_name,
                    sender_name=share.sender.name, contact=rules.contact, now=now)
                outbox.enqueue(runtime, notice, kind=Mail.REVOKED, to_addr=grant.address,
                               share=share, grant=grant)
        if address is None and changed:
            audit.record(runtime.audit_key, Audit.SHARE_REVOKED, now, actor=actor, share=share,
                         detail={"grants": len(changed)})
    return Result(_revoke_summary(changed, address), tuple(lines), tuple(changed))


def _unchanged_by_revoke(grant: Grant, state: str, share: Share) -> str:
    when = grant.ended_at or grant.deadline
    if state == GrantState.REVOKED:
        return (f"{grant.address}: already revoked "
                f"({local_text(when, share.clinic.timezone)})")
    return (f"{grant.address}: the link had expired unclaimed "
            f"({local_text(when, share.clinic.timezone)}); nothing to withdraw")


def _revoke_summary(changed: list[str], address: str | None) -> str:
    if address is not None:
        if changed:
            return f"Access withdrawn from {changed[0]}."
        return f"Nothing to withdraw from {normalise_address(address)}: access already ended."
    if not changed:
        return "Already revoked: no recipient has access to this share."
    return f"Access withdrawn from {_count(len(changed), 'recipient')}."


# --- resend ----------------------------------------------------------------------------------


def resend(runtime: Runtime, share: Share, *, address: str | None = None,
           actor: str) -> Result:
    """Fresh links for recipients who have not claimed (pending or expired): a new token (the
    old link stops working), a new deadline `now + claim_hours`, a new link e-mail without PHI.
    Claimed grants need no link; revoked grants stay revoked."""
    grants = _grants(share, address)
    if address is not None and not grants:
        return _not_a_recipient(address)
    settings = runtime.settings
    now = runtime.clock()
    rules = clinics.policy(share.clinic, settings)
    deadline = now + dt.timedelta(hours=rules.claim_hours)
    when = local_text(deadline, share.clinic.timezone)
    documents = share.documents.count()
    lines, changed = [], []
    with runtime.db.atomic():
        for grant in grants:
            was = effective_state(grant, now)
            token = tokens.new_link_token()
            done = (Grant.update(token_hash=tokens.hash_token(token), state=GrantState.PENDING,
                                 deadline=deadline, ended_at=None, reminded_at=None,
                                 expiry_reported_at=None, delivery=Delivery.QUEUED)
                    .where((Grant.id == grant.id)
                           & Grant.state.in_((GrantState.PENDING, GrantState.EXPIRED)))
                    .execute()) if was in (GrantState.PENDING, GrantState.EXPIRED) else 0
            if not done:
                lines.append(f"{grant.address}: " + (
                    "has claimed the documents; no new link needed" if was == GrantState.CLAIMED
                    else "access was revoked; no new link sent"))
                continue
            changed.append(grant.address)
            lines.append(f"{grant.address}: new link sent, can be claimed until {when}")
            audit.record(runtime.audit_key, Audit.LINKS_RESENT, now, actor=actor, share=share,
                         grant=grant,
                         detail={"was": was})
            link = compose.link_email(settings, to=grant.address,
                                      link_url=compose.link_url(settings.service.base_url, token),
                                      clinic_name=rules.display_name,
                                      sender_name=share.sender.name,
                                      document_count=documents, deadline_text=when,
                                      contact=rules.contact, now=now)
            outbox.enqueue(runtime, link, kind=Mail.LINK, to_addr=grant.address, share=share,
                           grant=grant)
    if changed:
        summary = f"New links sent to {_count(len(changed), 'recipient')}."
    elif address is not None:
        summary = f"No new link for {normalise_address(address)}: nothing to resend."
    else:
        summary = "No unclaimed recipients to resend to."
    return Result(summary, tuple(lines), tuple(changed))


# --- extend ----------------------------------------------------------------------------------


def extend(runtime: Runtime, share: Share, *, hours: float | None = None,
           actor: str) -> Result:
    """More time for links not yet claimed: each pending grant's deadline moves to
    max(deadline, now) + hours (default `claim_hours`, at most `max_extend_hours`), and its
    reminder may be sent again. Expired links need `resend` instead."""
    limits = runtime.settings.shares
    default = clinics.policy(share.clinic, runtime.settings).claim_hours
    wanted = default if hours is None else float(hours)
    if not math.isfinite(wanted) or wanted <= 0:
        raise LifecycleError("hours must be a number more than 0")
    added = min(wanted, limits.max_extend_hours)
    now = runtime.clock()
    tz = share.clinic.timezone
    lines, changed = [], []
    with runtime.db.atomic():
        for grant in _grants(share, None):
            was = effective_state(grant, now)
            deadline = max(grant.deadline, now) + dt.timedelta(hours=added)
            done = (Grant.update(deadline=deadline, reminded_at=None)
                    .where((Grant.id == grant.id) & (Grant.state == GrantState.PENDING)
                           & (Grant.deadline > now))
                    .execute()) if was == GrantState.PENDING else 0
            if not done:
                lines.append(f"{grant.address}: " + {
                    GrantState.CLAIMED: "has claimed the documents; nothing to extend",
                    GrantState.EXPIRED: "the link had expired; reply resend to send a new one",
                }.get(was, "access was revoked"))
                continue
            changed.append(grant.address)
            lines.append(f"{grant.address}: can now be claimed until {local_text(deadline, tz)}")
            audit.record(runtime.audit_key, Audit.DEADLINE_EXTENDED, now, actor=actor,
                         share=share, grant=grant,
                         detail={"hours": added, "deadline": deadline.isoformat()})
    capped = " (the most allowed)" if added < wanted else ""
    if changed:
        summary = (f"{_count(len(changed), 'unclaimed link')} extended by "
                   f"{added:g} hours{capped}.")
    else:
        summary = "No unclaimed links to extend."
    return Result(summary, tuple(lines), tuple(changed))


# --- status ----------------------------------------------------------------------------------


def status_report(runtime: Runtime, share: Share) -> str:
    """Plain text, per recipient (see `shares.status`): link sent, delivered to the relay,
    opened by a person, claimed, each document viewed/downloaded, revoked/expired — times in
    the clinic's time zone."""
    return status.share_status(runtime, share).text()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
