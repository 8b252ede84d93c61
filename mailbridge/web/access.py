"""What every portal page needs: the runtime, who is signed in, the caller's IP and agent for
the audit trail, and the access rules (which grant lets this account see which document)."""

from __future__ import annotations

import datetime as dt
import functools

from flask import current_app, redirect, request, session, url_for

from mailbridge import audit
from mailbridge.models import Account, Document, Grant
from mailbridge.runtime import Runtime


def runtime() -> Runtime:
    return current_app.config["RUNTIME"]


def now() -> dt.datetime:
    return runtime().clock()


def current_account() -> Account | None:
    return getattr(session, "account", None)


def client() -> dict:
    return {"ip": request.remote_addr or "",
            "user_agent": request.headers.get("User-Agent", "")[:400]}


def record(kind: str, **refs) -> None:
    """An audit event for this request (IP and user agent included), in its own transaction
    unless the caller has one open."""
    with runtime().db.atomic():
        audit.record(kind, now(), **client(), **refs)


def require_account(view):
    """Pages for signed-in recipients; others are sent to sign in and brought back."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if current_account() is None:
            return redirect(url_for("accounts.signin", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)

    return wrapper


def grant_state(grant: Grant, at: dt.datetime) -> str:
    """The state that counts now. Expiry is decided here too, so a stopped scheduler can never
    extend access."""
    if grant.state == "pending" and grant.deadline <= at:
        return "expired"
    return grant.state


def active_grant(account: Account, share_id: int) -> Grant | None:
    """The account's claimed, unrevoked grant for a share — the only thing that opens it."""
    return (Grant.select().where((Grant.account == account) & (Grant.share == share_id)
                                 & (Grant.state == "claimed")).first())


def accessible_document(account: Account, document_id: int) -> tuple[Document, Grant] | None:
    """None both for a missing document and for another account's: the same 404 (no IDOR)."""
    document = Document.get_or_none(Document.id == document_id)
    if document is None:
        return None
    grant = active_grant(account, document.share_id)
    return (document, grant) if grant is not None else None
