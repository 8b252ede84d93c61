"""The audit trail: every state change and every view or download becomes one row."""

from __future__ import annotations

import datetime as dt

from mailbridge.models import AuditEvent, Grant


def record(kind: str, at: dt.datetime, *, actor: str = "", detail: dict | None = None,
           **refs) -> AuditEvent:
    """Write one event inside the caller's transaction. `refs` are model foreign keys
    (share=, grant=, document=, member=, account=, inbound=) and ip=, user_agent=."""
    return AuditEvent.create(kind=kind, at=at, actor=actor, detail=detail or {}, **refs)


def events_for_share(share_id: int) -> list[AuditEvent]:
    """Everything that happened to a share, including events recorded against one of its
    grants only (codes, claims), oldest first."""
    grants = Grant.select(Grant.id).where(Grant.share == share_id)
    return list(AuditEvent.select()
                .where((AuditEvent.share == share_id) | AuditEvent.grant.in_(grants))
                .order_by(AuditEvent.at, AuditEvent.id))


def events_for_grant(grant_id: int) -> list[AuditEvent]:
    """Everything one recipient's link and access saw, oldest first."""
    return list(AuditEvent.select().where(AuditEvent.grant == grant_id)
                .order_by(AuditEvent.at, AuditEvent.id))
