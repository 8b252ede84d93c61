"""The link page (`/s/<token>`): shows what was shared and by whom. GET only shows — mail
scanners and link previews fetch links, so nothing here claims, consumes or signs in."""

from __future__ import annotations

from flask import Blueprint, current_app, render_template, request

from mailbridge import audit, tokens
from mailbridge.actions.share import deadline_text
from mailbridge.models import Grant
from mailbridge.web.access import grant_state

bp = Blueprint("links", __name__)


@bp.route("/s/<token>", methods=["GET", "HEAD"])
def link_page(token: str):
    runtime = current_app.config["RUNTIME"]
    grant = Grant.get_or_none(Grant.token_hash == tokens.hash_token(token)) if len(
        token) <= 64 else None
    if grant is None:
        return render_template("link_unknown.html"), 404
    share = grant.share
    now = runtime.clock()
    state = grant_state(grant, now)
    if request.method == "GET":
        with runtime.db.atomic():
            audit.record("link_shown", now, share=share, grant=grant,
                         ip=request.remote_addr or "",
                         user_agent=request.headers.get("User-Agent", "")[:400],
                         detail={"state": state})
    return render_template(
        "link.html", state=state, clinic=share.clinic.name, sender=share.sender.name,
        documents=share.documents.count(),
        deadline=deadline_text(grant.deadline, share.clinic.timezone))


def register(app, limiter) -> None:
    app.register_blueprint(bp)
