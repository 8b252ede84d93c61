"""Clinic pages of the staff console, for clinic admins: members (add, disable, make admin),
the clinic's settings (time zone, claim hours, contact line, display name) and the audit trail,
searchable by share, recipient, member and date, with CSV export."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from zoneinfo import ZoneInfo

from flask import (
    Blueprint,
    Flask,
    Response,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_limiter import Limiter

from mailbridge.clock import local_text
from mailbridge.shares import clinics, members, records
from mailbridge.store.models import AuditEvent, Clinic, Member
from mailbridge.store.states import Audit
from mailbridge.web import access
from mailbridge.web.staff_access import record, require_admin

bp = Blueprint("staff_clinic", __name__)

SHOWN_EVENTS = 200
RATE_LIMITS = {"staff_clinic.member_action": "30/minute", "staff_clinic.settings": "30/minute"}


def register(app: Flask, limiter: Limiter) -> None:
    app.register_blueprint(bp)
    for endpoint, rate in RATE_LIMITS.items():
        app.view_functions[endpoint] = limiter.limit(rate, methods=["POST"])(
            app.view_functions[endpoint])


# --- members ---------------------------------------------------------------------------------


@bp.get("/staff/clinic/members")
@require_admin
def members_page(member: Member, error: str | None = None, status: int = 200):
    rows = list(Member.select().where(Member.clinic == member.clinic_id)
                .order_by(Member.active.desc(), Member.name))
    return render_template("staff/members.html", member=member, members=rows,
                           error=error, form=request.form), status


@bp.post("/staff/clinic/members")
@require_admin
def member_action(member: Member):
    action, address = request.form.get("action", ""), request.form.get("email", "").strip()
    try:
        if action == "add":
            existing = Member.get_or_none(Member.email == members.normalise_address(address))
            if existing is not None and existing.clinic_id != member.clinic_id:
                raise members.MemberError(f"{address} belongs to another clinic")
            added = members.add_member(address, request.form.get("name", ""),
                                       member.clinic.name, access.now(),
                                       admin=request.form.get("admin") == "yes")
            record(Audit.MEMBER_ADDED, member, clinic=member.clinic_id,
                   detail={"member": added.email, "admin": added.is_admin})
            flash(f"{added.email} can now share and sign in to the console.")
        elif action in ("disable", "admin", "not_admin"):
            target = _colleague(member, address)
            if target.id == member.id:
                raise members.MemberError("you cannot change your own membership here; ask "
                                          "another admin")
            if action == "disable":
                members.disable_member(target.email)
                record(Audit.MEMBER_DISABLED, member, clinic=member.clinic_id,
                       detail={"member": target.email})
                flash(f"{target.email} is disabled: no more sharing, and the console is closed "
                      "to them at once.")
            else:
                members.set_admin(target.email, action == "admin")
                record(Audit.MEMBER_ADMIN_CHANGED, member, clinic=member.clinic_id,
                       detail={"member": target.email, "admin": action == "admin"})
                flash(f"{target.email} is {'now' if action == 'admin' else 'no longer'} "
                      "an admin.")
        else:
            raise members.MemberError("unknown action")
    except members.MemberError as exc:
        return members_page.__wrapped__(member, error=str(exc), status=400)
    return redirect(url_for("staff_clinic.members_page"))


def _colleague(admin: Member, address: str) -> Member:
    target = Member.get_or_none(Member.email == address.lower())
    if target is None or target.clinic_id != admin.clinic_id:
        raise members.MemberError(f"{address} is not a member of this clinic")
    return target


# --- settings --------------------------------------------------------------------------------


@bp.route("/staff/clinic/settings", methods=["GET", "POST"])
@require_admin
def settings(member: Member):
    clinic = Clinic.get_by_id(member.clinic_id)
    error = None
    if request.method == "POST":
        form = request.form
        try:
            hours = float(form.get("claim_hours", "") or 0) or None
        except ValueError:
            hours = float("nan")
        changes = clinics.Changes(timezone=form.get("timezone", "").strip() or None,
                                  claim_hours=hours, contact=form.get("contact", ""),
                                  display_name=form.get("display_name", ""),
                                  watermark=form.get("watermark") or None)
        try:
            clinics.change(clinic, changes)
        except clinics.ClinicError as exc:
            error = (exc.field.removeprefix("--").replace("-", "_"), str(exc))
            clinic = Clinic.get_by_id(member.clinic_id)  # nothing saved
        else:
            record(Audit.CLINIC_CHANGED, member, clinic=member.clinic_id, detail={
                "timezone": clinic.timezone, "claim_hours": clinic.claim_hours,
                "contact": clinic.contact, "display_name": clinic.display_name,
                "watermark": clinic.watermark})
            flash("The clinic's settings are saved.")
            return redirect(url_for("staff_clinic.settings"))
    policy = clinics.policy(clinic, access.runtime().settings)
    return render_template("staff/settings.html", member=member, clinic=clinic, policy=policy,
                           error=error, form=request.form,
                           config_watermark=access.runtime().settings.documents.watermark
                           ), 400 if error else 200


# --- audit trail -----------------------------------------------------------------------------


@bp.get("/staff/clinic/audit")
@require_admin
def audit_page(member: Member):
    selection, problem = _selection(member)
    events = (list(records.query(selection).order_by(AuditEvent.seq.desc())
                   .limit(SHOWN_EVENTS)) if selection is not None else [])
    tz = member.clinic.timezone
    return render_template("staff/audit.html", member=member, rows=[_row(e, tz) for e in events],
                           args=request.args, problem=problem, limit=SHOWN_EVENTS,
                           timezone=tz), 400 if problem else 200


@bp.get("/staff/clinic/audit.csv")
@require_admin
def audit_csv(member: Member):
    """The same export as `mailbridge audit export`, of what the search found, streamed.
    Exporting is itself an audit event: the file holds PHI (document names)."""
    selection, problem = _selection(member)
    if selection is None:
        return Response(f"{problem}\n", status=400, mimetype="text/plain")
    record(Audit.AUDIT_EXPORTED, member, clinic=member.clinic_id,
           detail={k: v for k, v in request.args.items() if v})
    runtime = access.runtime()

    def lines():
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=records.FIELDS)
        writer.writeheader()
        for row in records.rows(runtime, selection):
            writer.writerow(row)
            if out.tell() > 64 * 1024:
                yield out.getvalue()
                out.seek(0)
                out.truncate()
        yield out.getvalue()

    return Response(lines(), mimetype="text/csv", headers={
        "Content-Disposition": 'attachment; filename="audit.csv"'})


def _selection(member: Member) -> tuple[records.Selection | None, str | None]:
    """The clinic's events, narrowed by the search form (dates in the clinic's zone); None and
    the reason when a field is wrong."""
    args = request.args
    share_id = args.get("share", "").strip().lstrip("#")
    if share_id and not share_id.isdigit():
        return None, "Share: give the share's number, e.g. 12."
    tz = ZoneInfo(member.clinic.timezone)
    edges = {}
    for name, bound in (("from", 0), ("to", 1)):
        value = args.get(name, "").strip()
        if not value:
            continue
        try:
            day = dt.date.fromisoformat(value) + dt.timedelta(days=bound)
        except ValueError:
            return None, f"{name.title()}: a date such as 2026-11-28."
        edges[name] = (dt.datetime.combine(day, dt.time(), tz).astimezone(dt.UTC)
                       .replace(tzinfo=None))
    return records.Selection(
        clinic=member.clinic, share_id=int(share_id) if share_id else None,
        recipient=args.get("recipient", "").strip().lower() or None,
        actor=args.get("member", "").strip().lower() or None,
        since=edges.get("from"), until=edges.get("to")), None


def _row(event: AuditEvent, tz: str) -> dict:
    recipient = event.grant.address if event.grant_id and event.grant else ""
    return {"seq": event.seq, "at": local_text(event.at, tz), "kind": event.kind,
            "actor": event.actor, "share": event.share_id or "", "recipient": recipient,
            "ip": event.ip, "detail": json.dumps(event.detail or {}, sort_keys=True)}
