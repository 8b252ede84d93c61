""""Request access for my own address", under a link's own path (`/s/<token>/request`): for
someone the link was forwarded to. GET shows the form; the POSTs e-mail a code to the address
given and, with the right code, ask the share's sender (`shares.access_requests`)."""

from __future__ import annotations

from flask import Blueprint, Flask, flash, redirect, render_template, request, session, url_for
from flask_limiter import Limiter

from mailbridge.shares import access_requests
from mailbridge.shares.access_requests import Refused
from mailbridge.shares.lifecycle import effective_state
from mailbridge.store.models import AccessRequest, Grant
from mailbridge.store.states import AccessState
from mailbridge.web import access
from mailbridge.web.access import current_account
from mailbridge.web.links import find, not_found, state_page

bp = Blueprint("link_requests", __name__)

# Per IP; per link and per address the limits are in shares.access_requests.
LIMITS = {"form": "30/minute", "ask": "5/minute;20/hour", "confirm": "10/minute"}
SESSION_KEY = "access_request"


def register(app: Flask, limiter: Limiter) -> None:
    app.register_blueprint(bp)
    for name, limit in LIMITS.items():
        endpoint = f"link_requests.{name}"
        app.view_functions[endpoint] = limiter.limit(limit)(app.view_functions[endpoint])


def _usable(token: str):
    """The grant, or the response for a link through which no access can be asked."""
    grant = find(token)
    if grant is None:
        return None, not_found()
    now = access.now()
    if not access_requests.requestable(grant, now):
        return None, state_page(grant, effective_state(grant, now))
    account = current_account()
    if account is not None and account.email == grant.address.lower():
        return None, redirect(url_for("links.link_page", token=token))  # it is theirs
    return grant, None


@bp.get("/s/<token>/request")
def form(token: str):
    grant, refusal = _usable(token)
    if refusal is not None:
        return refusal
    waiting = _waiting(grant)
    if waiting is not None and request.args.get("again") is None:
        return _page(grant, "code", address=waiting.address)
    account = current_account()
    return _page(grant, "address", address=account.email if account else "")


@bp.post("/s/<token>/request")
def ask(token: str):
    grant, refusal = _usable(token)
    if refusal is not None:
        return refusal
    address = request.form.get("email", "")
    client = access.client()
    result = access_requests.send_code(access.runtime(), grant, address,
                                       request.form.get("name", ""), ip=client["ip"],
                                       user_agent=client["user_agent"])
    if isinstance(result, Refused):
        return _page(grant, "address", address=address[:320],
                     name=request.form.get("name", "")[:100], error=result.message,
                     status=result.status)
    session[SESSION_KEY] = {"id": result.id, "grant_id": grant.id}
    flash(f"We sent a code to {result.address}. It works for "
          f"{access_requests.CODE_MINUTES} minutes.")
    return redirect(url_for("link_requests.form", token=token))


@bp.post("/s/<token>/request/code")
def confirm(token: str):
    grant, refusal = _usable(token)
    if refusal is not None:
        return refusal
    waiting = _waiting(grant, live_only=False)
    if waiting is None:
        flash("Please give your address again: we will send a new code.")
        return redirect(url_for("link_requests.form", token=token, again=1))
    client = access.client()
    result = access_requests.verify(access.runtime(), waiting.id, grant,
                                    request.form.get("code", ""), ip=client["ip"],
                                    user_agent=client["user_agent"])
    if isinstance(result, Refused):
        return _page(grant, "code", address=waiting.address, error=result.message,
                     status=result.status)
    session.pop(SESSION_KEY, None)
    return _page(grant, "sent", address=waiting.address, already=result.already)


def _waiting(grant: Grant, *, live_only: bool = True) -> AccessRequest | None:
    """This browser's request through this link still waiting for its code."""
    entry = session.get(SESSION_KEY)
    if not isinstance(entry, dict) or entry.get("grant_id") != grant.id \
            or not isinstance(entry.get("id"), int):
        return None
    row = AccessRequest.get_or_none((AccessRequest.id == entry["id"])
                                    & (AccessRequest.origin == grant)
                                    & (AccessRequest.state == AccessState.UNVERIFIED))
    if row is None or (live_only and row.code_expires_at <= access.now()):
        return None
    return row


def _page(grant: Grant, step: str, *, status: int = 200, **values):
    # Who shared is on the link page for anyone holding the link; nothing more is shown here.
    share = grant.share
    hours = access.runtime().settings.shares.access_request_hours
    return render_template("link_request.html", step=step, token=request.view_args["token"],
                           sender=share.sender.name, clinic=share.clinic.name,
                           code_minutes=access_requests.CODE_MINUTES,
                           request_hours=f"{hours:g}", **values), status
