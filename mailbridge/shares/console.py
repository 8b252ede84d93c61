"""What the staff console does to shares, on top of the very operations the reply commands and
the CLI use (`lifecycle`): who may act, the action's audit event with the member as actor, and
the e-mail telling the sender when a clinic admin acted on their share.

Clinic admins may always act on their clinic's shares in the console; `[shares]
allow_clinic_admins` governs replies only (a reply is a weaker proof of who is acting than a
signed-in console session, and a practice manager covering for an absent colleague is what the
console is for)."""

from __future__ import annotations

from mailbridge.outbound import outbox
from mailbridge.runtime import Runtime
from mailbridge.shares import lifecycle, notices
from mailbridge.store import audit
from mailbridge.store.models import Member, Share
from mailbridge.store.states import Audit

ACTIONS = ("revoke", "resend", "extend")


def may_act(member: Member, share: Share) -> bool:
    if not member.active:
        return False
    return member.id == share.sender_id or (member.is_admin
                                            and member.clinic_id == share.clinic_id)


def act(runtime: Runtime, share: Share, member: Member, action: str, *,
        address: str | None = None, hours: float | None = None, ip: str = "",
        user_agent: str = "") -> lifecycle.Result:
    """Run `action` ("revoke", "resend" or "extend") for `member` in one transaction: the
    change, its events, the recipients' e-mails and, when the member is not the sender, the
    sender's notice. Raises PermissionError if the member may not, LifecycleError for bad
    hours."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    if not may_act(member, share):
        raise PermissionError("this member may not manage this share")
    actor = member.email
    with runtime.db.atomic():
        if action == "revoke":
            result = lifecycle.revoke(runtime, share, address=address, actor=actor)
        elif action == "resend":
            result = lifecycle.resend(runtime, share, address=address, actor=actor)
        else:
            result = lifecycle.extend(runtime, share, hours=hours, actor=actor)
        described = " ".join(part for part in (action, address or "",
                                                f"{hours:g} hours" if hours else "") if part)
        told = notices.colleague_acted(runtime, share, member, described, result.summary,
                                       result.lines)
        audit.record(runtime.audit_key, Audit.CONSOLE_ACTION, runtime.clock(), actor=actor,
                     share=share, member=member, ip=ip, user_agent=user_agent,
                     detail={"action": action, "recipient": address or "",
                             "hours": hours, "changed": len(result.changed),
                             "sender_told": told})
    outbox.notify(runtime)
    return result
