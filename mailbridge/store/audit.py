"""The audit trail: every state change and every view or download becomes one row."""

from __future__ import annotations

import datetime as dt

from mailbridge.store.models import AuditEvent


def record(kind: str, at: dt.datetime, *, actor: str = "", detail: dict | None = None,
           **refs) -> AuditEvent:
    """Write one event inside the caller's transaction. `refs` are model foreign keys
    (share=, grant=, document=, member=, account=, inbound=) and ip=, user_agent=."""
    return AuditEvent.create(kind=kind, at=at, actor=actor, detail=detail or {}, **refs)
