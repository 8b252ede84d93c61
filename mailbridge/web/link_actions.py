"""What a person does on the link page itself, beside the flow in `links`: press Continue (a
POST, so the audit trail tells a person from a mail scanner, which only fetches), and on an
expired link ask the sender for a new one."""

from __future__ import annotations

from flask import Blueprint, Flask, redirect, url_for
from flask_limiter import Limiter

from mailbridge.shares import notices
from mailbridge.shares.lifecycle import effective_state
from mailbridge.store.states import Audit, GrantState
from mailbridge.web import access
from mailbridge.web.links import find, not_found, state_page

bp = Blueprint("link_actions", __name__)

# Per IP, like the link flow's own limits.
LIMITS = {"proceed": "30/minute", "ask_again": "5/minute"}


def register(app: Flask, limiter: Limiter) -> None:
    """Both forms go without a CSRF token: the link's own secret token is in the address they
    post to, which a forger on another site does not have — and the link page then sets no
    cookie at all, for the scanners that fetch it."""
    app.register_blueprint(bp)
    for name, limit in LIMITS.items():
        endpoint = f"link_actions.{name}"
        app.extensions["csrf"].exempt(app.view_functions[endpoint])
        app.view_functions[endpoint] = limiter.limit(limit)(app.view_functions[endpoint])


@bp.post("/s/<token>/continue")
def proceed(token: str):
    """Continue: the first step only a person takes (a scanner's GET of the page is not one).
    The flow's pages themselves check who may go on."""
    grant = find(token)
    if grant is None:
        return not_found()
    access.record(Audit.LINK_CONTINUED, share=grant.share_id, grant=grant,
                  detail={"state": effective_state(grant, access.now())})
    return redirect(url_for("links.next_step", token=token))


@bp.post("/s/<token>/ask")
def ask_again(token: str):
    """"Ask for a new link" on an expired link: the sender is e-mailed a resend request (at
    most once per grant in `notices.RESEND_REQUEST_WINDOW`). The page says the same either
    way and shows nothing of the share."""
    grant = find(token)
    if grant is None:
        return not_found()
    state = effective_state(grant, access.now())
    if state != GrantState.EXPIRED:
        return state_page(grant, state)
    client = access.client()
    notices.request_resend(access.runtime(), grant, ip=client["ip"],
                           user_agent=client["user_agent"])
    return state_page(grant, state, asked=True)
