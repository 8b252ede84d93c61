"""The staff console's **Requests** page: requests for access made through forwarded links, on
the member's shares (a clinic admin: the clinic's), with Approve and Deny — a confirmation
page, then a POST running the same answer as an `approve`/`deny` reply (`access_answers`)."""

from __future__ import annotations

from flask import Blueprint, Flask, abort, flash, redirect, render_template, request, url_for
from flask_limiter import Limiter

from mailbridge.shares import access_answers, console
from mailbridge.shares.access_requests import state_of
from mailbridge.store import sealed
from mailbridge.store.models import AccessRequest, Member, Share
from mailbridge.store.states import AccessState
from mailbridge.web import access
from mailbridge.web.staff_access import require_member

bp = Blueprint("staff_requests", __name__)

RECENT = 30  # answered or lapsed requests listed below the open ones
RATE_LIMITS = {"staff_requests.decide": "30/minute"}


def register(app: Flask, limiter: Limiter) -> None:
    app.register_blueprint(bp)
    for endpoint, rate in RATE_LIMITS.items():
        app.view_functions[endpoint] = limiter.limit(rate)(app.view_functions[endpoint])


def _visible(member: Member):
    """Requests on shares this member may act on: their own, or their clinic's if admin."""
    query = (AccessRequest.select(AccessRequest, Share).join(Share)
             .where(AccessRequest.state != AccessState.UNVERIFIED))
    if member.is_admin:
        return query.where(Share.clinic == member.clinic_id)
    return query.where(Share.sender == member)


def _row(runtime, item: AccessRequest, now) -> dict:
    share = item.share
    return {"request": item, "state": str(state_of(item, now)), "share": share,
            "title": sealed.share_title(runtime.phi_key, share),
            "origin": item.origin.address, "tz": share.clinic.timezone}


@bp.get("/staff/requests")
@require_member
def requests_page(member: Member):
    runtime, now = access.runtime(), access.now()
    rows = [_row(runtime, item, now) for item in
            _visible(member).order_by(AccessRequest.requested_at.desc(), AccessRequest.id.desc())
            .limit(200)]
    waiting = [r for r in rows if r["state"] == AccessState.OPEN]
    done = [r for r in rows if r["state"] != AccessState.OPEN][:RECENT]
    return render_template("staff/requests.html", member=member, waiting=waiting, done=done)


def _request_for(member: Member, request_id: int) -> AccessRequest:
    item = AccessRequest.get_or_none(AccessRequest.id == request_id)
    if item is None or item.state == AccessState.UNVERIFIED \
            or not console.may_act(member, item.share):
        abort(404)  # another clinic's request answers like a missing one
    return item


@bp.get("/staff/requests/<int:request_id>/confirm")
@require_member
def confirm(member: Member, request_id: int):
    item = _request_for(member, request_id)
    decision = request.args.get("decision", "")
    if decision not in access_answers.DECISIONS:
        abort(404)
    row = _row(access.runtime(), item, access.now())
    return render_template("staff/request_confirm.html", member=member, item=row,
                           decision=decision, sender=item.share.sender)


@bp.post("/staff/requests/<int:request_id>/decide")
@require_member
def decide(member: Member, request_id: int):
    item = _request_for(member, request_id)
    decision = request.form.get("decision", "")
    if decision not in access_answers.DECISIONS:
        abort(400)
    client = access.client()
    result = access_answers.decide(access.runtime(), item, decision, member, via="console",
                                   ip=client["ip"], user_agent=client["user_agent"])
    flash(result.summary)
    for line in result.lines:
        flash(line)
    if result.changed and item.share.sender_id != member.id:
        flash(f"{item.share.sender.name} has been told by e-mail.")
    return redirect(url_for("staff_requests.requests_page"))
