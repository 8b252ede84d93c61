"""The sender's answer to a request for access (`access_requests`), by reply (`approve` /
`deny`) or in the staff console: approve gives the requester a grant of their own — its own
link and claim window, audited with the forwarded link's grant as its origin; deny tells the
requester, without PHI. Each request is answered once."""

from __future__ import annotations

import datetime as dt

from mailbridge.clock import local_text
from mailbridge.outbound import compose, outbox
from mailbridge.runtime import Runtime
from mailbridge.shares import clinics, notices
from mailbridge.shares.access_requests import state_of
from mailbridge.shares.lifecycle import Result, normalise_address
from mailbridge.store import audit, tokens
from mailbridge.store.models import AccessRequest, Grant, Member, Share
from mailbridge.store.states import LIVE, AccessState, Audit, Mail, grant_state

DECISIONS = ("approve", "deny")


def open_requests(share: Share, now: dt.datetime) -> list[AccessRequest]:
    return list(AccessRequest.select().where((AccessRequest.share == share)
                                             & (AccessRequest.state == AccessState.OPEN)
                                             & (AccessRequest.expires_at > now))
                .order_by(AccessRequest.id))


def for_reply(share: Share, address: str, referenced: list[str],
              now: dt.datetime) -> AccessRequest | Result:
    """The request a reply answers: the one from `address` if given, else the one whose
    e-mail the reply answers (In-Reply-To/References), else the share's only open one.
    A Result says why none is meant."""
    requests = AccessRequest.select().where(AccessRequest.share == share)
    if address:
        wanted = normalise_address(address)
        found = requests.where(AccessRequest.address == wanted).order_by(
            AccessRequest.id.desc())
        found = [r for r in found if r.state != AccessState.UNVERIFIED]
        return found[0] if found else Result(
            f"{wanted} has not asked for access to this share; nothing was changed.")
    if referenced:
        answered = [r for r in requests.where(AccessRequest.notice_message_id.in_(referenced))]
        if answered:
            return sorted(answered, key=lambda r: referenced.index(r.notice_message_id))[0]
    waiting = open_requests(share, now)
    if len(waiting) == 1:
        return waiting[0]
    if not waiting:
        return Result("Nobody is waiting for an answer about access to this share; nothing was "
                      "changed.")
    return Result("Several people asked for access to this share; nothing was changed. Reply "
                  "to the request e-mail itself, or write for example: approve "
                  f"{waiting[0].address}", tuple(r.address for r in waiting))


def decide(runtime: Runtime, request: AccessRequest, decision: str, member: Member, *,
           via: str, ip: str = "", user_agent: str = "") -> Result:
    """Approve or deny `request` for `member` (who may manage its share: the caller checked),
    in one transaction with its e-mails and audit events. `via` is "reply" or "console"; in
    the console a clinic admin acting on a colleague's share tells the sender."""
    if decision not in DECISIONS:
        raise ValueError(f"unknown decision {decision!r}")
    share = request.share
    with runtime.db.atomic():
        result = (_approve if decision == "approve" else _deny)(runtime, request, member, via,
                                                                 ip, user_agent)
        if via == "console" and result.changed:
            notices.colleague_acted(runtime, share, member, f"{decision} {request.address}",
                                    result.summary, result.lines)
    outbox.notify(runtime)
    return result


def _unanswerable(request: AccessRequest, now: dt.datetime) -> Result | None:
    """Why this request can no longer be answered, or None."""
    tz = request.share.clinic.timezone
    state = state_of(request, now)
    if state == AccessState.OPEN:
        return None
    if state == AccessState.EXPIRED:
        return Result(f"The request from {request.address} lapsed unanswered on "
                      f"{local_text(request.expires_at, tz)}; nothing was changed. They can "
                      "ask again through the link.")
    if state == AccessState.UNVERIFIED:
        return Result(f"{request.address} has not asked for access to this share; nothing was "
                      "changed.")
    verb = "approved" if state == AccessState.APPROVED else "denied"
    return Result(f"The request from {request.address} was already {verb} "
                  f"({local_text(request.decided_at, tz)}, by {request.decided_by}); nothing "
                  "was changed.")


def _close(request: AccessRequest, state: AccessState, member: Member, now: dt.datetime,
           grant: Grant | None = None) -> bool:
    """Answer the request once: conditional, so two answers at the same moment decide once."""
    return bool(AccessRequest.update(state=state, decided_at=now, decided_by=member.email,
                                     grant=grant)
                .where((AccessRequest.id == request.id)
                       & (AccessRequest.state == AccessState.OPEN)
                       & (AccessRequest.expires_at > now)).execute())


def _approve(runtime: Runtime, request: AccessRequest, member: Member, via: str, ip: str,
             user_agent: str) -> Result:
    now = runtime.clock()
    refusal = _unanswerable(request, now)
    if refusal is not None:
        return refusal
    share = request.share
    if share.purged_at is not None:
        return Result("The documents of this share were removed under the clinic's retention "
                      "policy; nothing was changed.")
    existing = [g for g in Grant.select().where((Grant.share == share)
                                                & (Grant.address == request.address))
                if grant_state(g.state, g.deadline, now) in LIVE]
    detail = {"access_request": request.id, "origin_grant": request.origin_id, "via": via}
    refs = dict(actor=member.email, member=member, share=share, ip=ip, user_agent=user_agent)
    if existing:
        if not _close(request, AccessState.APPROVED, member, now, existing[0]):
            return _unanswerable(AccessRequest.get_by_id(request.id), now)
        audit.record(runtime.audit_key, Audit.ACCESS_APPROVED, now, grant=existing[0],
                     detail={**detail, "new_grant": False}, **refs)
        return Result(f"{request.address} already has access to this share; no new link was "
                      "needed.", changed=(request.address,))
    rules = clinics.policy(share.clinic, runtime.settings)
    deadline = now + dt.timedelta(hours=rules.claim_hours)
    token = tokens.new_link_token()
    grant = Grant.create(share=share, address=request.address,
                         token_hash=tokens.hash_token(token), deadline=deadline,
                         created_at=now)
    if not _close(request, AccessState.APPROVED, member, now, grant):
        Grant.delete().where(Grant.id == grant.id).execute()
        return _unanswerable(AccessRequest.get_by_id(request.id), now)
    when = local_text(deadline, share.clinic.timezone)
    audit.record(runtime.audit_key, Audit.GRANT_CREATED, now, grant=grant,
                 detail={"origin_grant": request.origin_id, "access_request": request.id},
                 **refs)
    audit.record(runtime.audit_key, Audit.ACCESS_APPROVED, now, grant=grant,
                 detail={**detail, "new_grant": True}, **refs)
    link = compose.link_email(runtime.settings, to=request.address,
                              link_url=compose.link_url(runtime.settings.service.base_url, token),
                              clinic_name=rules.display_name, sender_name=share.sender.name,
                              document_count=share.documents.count(), deadline_text=when,
                              contact=rules.contact, now=now)
    outbox.enqueue(runtime, link, kind=Mail.LINK, to_addr=request.address, share=share,
                   grant=grant)
    return Result(f"Access given to {request.address}.",
                  (f"{request.address}: a link of their own was sent, can be claimed until "
                   f"{when}",), (request.address,))


def _deny(runtime: Runtime, request: AccessRequest, member: Member, via: str, ip: str,
          user_agent: str) -> Result:
    now = runtime.clock()
    refusal = _unanswerable(request, now)
    if refusal is not None:
        return refusal
    if not _close(request, AccessState.DENIED, member, now):
        return _unanswerable(AccessRequest.get_by_id(request.id), now)
    share = request.share
    rules = clinics.policy(share.clinic, runtime.settings)
    audit.record(runtime.audit_key, Audit.ACCESS_REFUSED, now, actor=member.email,
                 member=member, share=share, grant=request.origin_id, ip=ip,
                 user_agent=user_agent,
                 detail={"access_request": request.id, "address": request.address,
                         "via": via})
    notice = compose.access_refused_email(runtime.settings, to=request.address,
                                          clinic_name=rules.display_name,
                                          sender_name=share.sender.name,
                                          contact=rules.contact, now=now)
    outbox.enqueue(runtime, notice, kind=Mail.ACCESS_REFUSED, to_addr=request.address)
    return Result(f"Access refused to {request.address}; they were told, without any detail "
                  "of the share.", changed=(request.address,))
