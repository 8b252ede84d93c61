"""The staff console's share pages: **Sent** (the member's own shares) and, for clinic admins,
every share of the clinic; one share with each recipient's state; and Revoke (all or one),
Resend and Extend — a confirmation page, then a POST that runs the same operations as the
reply commands and the CLI (`shares.console`)."""

from __future__ import annotations

from flask import Blueprint, Flask, abort, flash, redirect, render_template, request, url_for
from flask_limiter import Limiter

from mailbridge.clock import local_text
from mailbridge.shares import clinics, console, status
from mailbridge.shares.lifecycle import LifecycleError
from mailbridge.store import sealed
from mailbridge.store.models import Grant, Member, SentBack, Share
from mailbridge.store.states import GrantState
from mailbridge.web import access
from mailbridge.web.staff_access import require_admin, require_member

bp = Blueprint("staff_sent", __name__)

PAGE = 50
RATE_LIMITS = {"staff_sent.act": "30/minute"}


def register(app: Flask, limiter: Limiter) -> None:
    app.register_blueprint(bp)
    app.add_template_filter(lambda at, member: local_text(at, member.clinic.timezone),
                            "staff_time")
    for endpoint, rate in RATE_LIMITS.items():
        app.view_functions[endpoint] = limiter.limit(rate)(app.view_functions[endpoint])


@bp.get("/staff/sent")
@require_member
def sent(member: Member):
    query = Share.select().where((Share.sender == member) & _not_sent_back())
    return _listing(member, query, "staff/sent.html", "staff_sent.sent")


@bp.get("/staff/clinic")
@require_admin
def clinic_shares(member: Member):
    query = Share.select().where((Share.clinic == member.clinic_id) & _not_sent_back())
    return _listing(member, query, "staff/clinic_shares.html", "staff_sent.clinic_shares")


def _not_sent_back():
    # Documents recipients sent back are kept as shares too; they are listed under the share
    # they answer (staff/_sent_back.html), not as shares the member made.
    return Share.id.not_in(SentBack.select(SentBack.share))


def _listing(member: Member, query, template: str, endpoint: str):
    """Newest first; the search matches title (sealed, so read here) and recipient address."""
    runtime = access.runtime()
    words = " ".join(request.args.get("q", "").split())[:200]
    wanted = words.lower()
    rows = []
    for share in query.order_by(Share.created_at.desc(), Share.id.desc()):
        title = sealed.share_title(runtime.phi_key, share)
        grants = list(Grant.select().where(Grant.share == share).order_by(Grant.id))
        if wanted and wanted not in title.lower() and not any(
                wanted in g.address for g in grants):
            continue
        rows.append(share)
        if len(rows) >= PAGE:
            break
    summaries = [_summary(runtime, share) for share in rows]
    return render_template(template, member=member, shares=summaries, q=words,
                           endpoint=endpoint)


def _summary(runtime, share: Share) -> dict:
    report = status.share_status(runtime, share)
    return {"share": share, "report": report, "recipients": [
        (r, recipient_label(r)) for r in report.recipients]}


def recipient_label(recipient: status.RecipientStatus) -> str:
    """One word or phrase a person reads at a glance."""
    if recipient.bounced and recipient.state == GrantState.PENDING:
        return "bounced"
    if recipient.state in (GrantState.REVOKED, GrantState.EXPIRED):
        return str(recipient.state)
    if recipient.state == GrantState.CLAIMED:
        seen = []
        if recipient.views:
            seen.append(f"viewed {recipient.views}×")
        if recipient.downloads:
            seen.append(f"downloaded {recipient.downloads}×")
        return "claimed" + (f", {', '.join(seen)}" if seen else "")
    if recipient.opened_at is not None:
        return "opened in a browser"
    if recipient.sent_at is not None:
        return "delivered"
    return "sent"


def _share_for(member: Member, share_id: int) -> Share:
    share = Share.get_or_none(Share.id == share_id)
    if share is None or not console.may_act(member, share):
        abort(404)  # another clinic's share answers like a missing one
    return share


@bp.get("/staff/shares/<int:share_id>")
@require_member
def share_page(member: Member, share_id: int):
    share = _share_for(member, share_id)
    summary = _summary(access.runtime(), share)
    return render_template("staff/share.html", member=member, item=summary,
                           sender=share.sender, colleague=share.sender_id != member.id)


@bp.get("/staff/shares/<int:share_id>/confirm")
@require_member
def confirm(member: Member, share_id: int):
    share = _share_for(member, share_id)
    action = request.args.get("action", "")
    if action not in console.ACTIONS:
        abort(404)
    address = request.args.get("recipient", "").strip().lower() or None
    return render_template("staff/confirm.html", member=member, share=share, action=action,
                           address=address, sender=share.sender,
                           title=sealed.share_title(access.runtime().phi_key, share),
                           created=local_text(share.created_at, share.clinic.timezone),
                           hours=f"{_claim_hours(share):g}")


@bp.post("/staff/shares/<int:share_id>/act")
@require_member
def act(member: Member, share_id: int):
    share = _share_for(member, share_id)
    action = request.form.get("action", "")
    if action not in console.ACTIONS:
        abort(400)
    address = request.form.get("recipient", "").strip().lower() or None
    hours = None
    if action == "extend":
        try:
            hours = float(request.form.get("hours", "") or _claim_hours(share))
        except ValueError:
            hours = -1.0
    client = access.client()
    try:
        result = console.act(access.runtime(), share, member, action, address=address,
                             hours=hours, ip=client["ip"], user_agent=client["user_agent"])
    except LifecycleError as exc:
        flash(f"Nothing was changed: {exc}.")
        return redirect(url_for("staff_sent.share_page", share_id=share.id))
    flash(result.summary)
    for line in result.lines:
        flash(line)
    if share.sender_id != member.id:
        flash(f"{share.sender.name} has been told by e-mail.")
    return redirect(url_for("staff_sent.share_page", share_id=share.id))


def _claim_hours(share: Share) -> float:
    return clinics.policy(share.clinic, access.runtime().settings).claim_hours
