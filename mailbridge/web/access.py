"""What every portal page needs: the runtime, who is signed in, the caller's IP and agent for
the audit trail, and the access rules (which grant lets this account see which document)."""

from __future__ import annotations

import datetime as dt
import functools
from typing import NoReturn

from flask import abort, current_app, redirect, request, session, url_for

from mailbridge.runtime import Runtime
from mailbridge.shares.lifecycle import effective_state
from mailbridge.store.models import Account, Document, Grant, Share
from mailbridge.store.states import Audit
from mailbridge.web import queries

# The portal's policy allows no script at all (web/__init__.py); the staff pages that handle
# passkeys load one static file of our own, and talk back to us with fetch().
CSP_WITH_SCRIPT = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                   "base-uri 'none'; frame-ancestors 'none'; script-src 'self'; "
                   "connect-src 'self'")


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
    """An audit event for this request (IP and user agent included), committed when this
    returns: in the caller's transaction if one is open, else with the events of requests
    recording at the same moment (web/audit_batch.py)."""
    event = dict(kind=kind, at=now(), **client(), **refs)
    current_app.extensions["mailbridge_audit"].record(event)


def require_account(view):
    """Pages for signed-in recipients; others are sent to sign in and brought back."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if current_account() is None:
            return redirect(url_for("accounts.signin", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)

    return wrapper


def active_grant(account: Account, share_id: int) -> Grant | None:
    """The account's claimed, unrevoked grant for a share — the only thing that opens it."""
    return Grant.select().where(queries.opens(account, share_id)).first()


def accessible_document(account: Account, document_id: int) -> tuple[Document, Grant] | None:
    """None both for a missing document and for another account's: the same 404 (no IDOR).
    A document shredded under retention (its key wiped) is gone for everyone."""
    found = current_app.extensions["mailbridge_queries"].document(account, document_id)
    if not found or not found[0].blob_key:
        return None
    return found[0], found[0].share.opening_grant


def denial_reason(account: Account, share_id: int) -> str:
    """Why this account may not open a share, for the audit trail only (never shown)."""
    grant = (Grant.select().where((Grant.account == account) & (Grant.share == share_id))
             .first())
    return effective_state(grant, now()) if grant is not None else "not_yours"


def refuse(account: Account, share_id: int | None, *, document: Document | None = None,
           **detail: int) -> NoReturn:
    """Audit a refused request and answer with the same 404 as for something missing."""
    exists = share_id is not None and Share.get_or_none(Share.id == share_id) is not None
    reason = denial_reason(account, share_id) if exists else "missing"
    record(Audit.ACCESS_DENIED, account=account, share=share_id if exists else None,
           document=document, detail={"reason": reason, **detail})
    abort(404)
