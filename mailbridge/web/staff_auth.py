"""Signing in to the staff console at `/staff`: members prove their address with a one-time
code the first time (and after forgetting their password), then sign in with a password under
the same rules, throttling and argon2id as recipients — or with a passkey (`staff_passkeys`).
No answer here tells whether an address is a member."""

from __future__ import annotations

import datetime as dt
import hmac
import secrets

from flask import Blueprint, Flask, flash, redirect, render_template, request, session, url_for
from flask_limiter import Limiter

from mailbridge.outbound import compose, outbox
from mailbridge.shares.members import find_active
from mailbridge.store import audit, tokens
from mailbridge.store.models import Member, StaffAccount, StaffCode
from mailbridge.store.states import Audit, Mail
from mailbridge.web import access, auth, sessions
from mailbridge.web.passwords import DUMMY_HASH, hash_password, password_problem, verify_password
from mailbridge.web.staff_access import (
    CSP_WITH_SCRIPT,
    current_member,
    page_after_sign_in,
    record,
)

bp = Blueprint("staff_auth", __name__)

CODE_MINUTES, CODE_MAX_ATTEMPTS, CODES_PER_WINDOW = 10, 5, 3
CODE_WINDOW = dt.timedelta(minutes=15)
VERIFIED_FOR = dt.timedelta(minutes=15)
MAX_ADDRESS = 320
SIGN_IN_FAILED = "The address or password is not right."
CODE_SENT = ("If {address} is a member's address, a code is on its way. It works for "
             f"{CODE_MINUTES} minutes.")
WRONG_CODE = "That code is not right, or no longer valid. Ask for a new code if needed."
RATE_LIMITS = {"staff_auth.signin": "20/minute", "staff_auth.send_code": "5/minute",
               "staff_auth.verify_code": "10/minute", "staff_auth.set_password": "10/minute"}


def register(app: Flask, limiter: Limiter) -> None:
    app.register_blueprint(bp)
    for endpoint, rate in RATE_LIMITS.items():
        app.view_functions[endpoint] = limiter.limit(rate)(app.view_functions[endpoint])


def _address() -> str:
    return request.form.get("email", "").strip().lower()[:MAX_ADDRESS]


@bp.get("/staff")
def signin_page():
    if current_member() is not None:
        return redirect(url_for("staff_sent.sent"))
    response = render_template("staff/signin.html", passkeys_script=True)
    return response, 200, {"Content-Security-Policy": CSP_WITH_SCRIPT}


@bp.post("/staff/signin")
def signin():
    runtime, now = access.runtime(), access.now()
    address, password = _address(), request.form.get("password", "")
    ip = request.remote_addr or ""
    if auth.throttled(runtime, address, ip, Audit.STAFF_SIGN_IN_FAILED, trusted_device=False):
        return _signin_error(auth.Throttled().message, 429)
    member = find_active(address)
    account = (StaffAccount.get_or_none(StaffAccount.member == member)
               if member is not None else None)
    if not verify_password(account.password_hash if account else DUMMY_HASH, password) \
            or account is None:
        record(Audit.STAFF_SIGN_IN_FAILED, member, actor=address)
        return _signin_error(SIGN_IN_FAILED, 400)
    return signed_in(member, "password", now)


def signed_in(member: Member, how: str, now: dt.datetime):
    """Start the member's session (a new id: no fixation) and go to the console page they
    asked for before signing in, else to their shares."""
    wanted = page_after_sign_in()
    sessions.sign_in_member(session._get_current_object(), member, now)
    record(Audit.STAFF_SIGNED_IN, member, detail={"with": how})
    return redirect(wanted or url_for("staff_sent.sent"))


def _signin_error(message: str, status: int):
    return (render_template("staff/signin.html", error=message, email=_address(),
                            passkeys_script=True), status,
            {"Content-Security-Policy": CSP_WITH_SCRIPT})


@bp.post("/staff/signout")
def signout():
    member = current_member()
    if member is not None:
        record(Audit.STAFF_SIGNED_OUT, member)
    sessions.sign_out(session._get_current_object(), access.now())
    return redirect(url_for("staff_auth.signin_page"))


# --- first time, or a forgotten password: a code to the member's address ---------------------


@bp.route("/staff/code", methods=["GET", "POST"])
def send_code():
    if request.method == "GET":
        return render_template("staff/code_request.html")
    address = _address()
    member = find_active(address)
    runtime, now = access.runtime(), access.now()
    session["staff_code_for"] = address
    if member is not None:
        recent = (StaffCode.select().where((StaffCode.member == member)
                                           & (StaffCode.created_at > now - CODE_WINDOW)).count())
        if recent < CODES_PER_WINDOW:
            code = f"{secrets.randbelow(10 ** 6):06d}"
            message = compose.staff_code_email(runtime.settings, to=member.email, code=code,
                                               minutes=CODE_MINUTES, now=now)
            with runtime.db.atomic():
                (StaffCode.update(expires_at=now)
                 .where((StaffCode.member == member) & StaffCode.used_at.is_null()
                        & (StaffCode.expires_at > now)).execute())
                StaffCode.create(member=member, code_hash=_code_hash(member, code),
                                 created_at=now,
                                 expires_at=now + dt.timedelta(minutes=CODE_MINUTES))
                record(Audit.STAFF_CODE_SENT, member)
                outbox.enqueue(runtime, message, kind=Mail.STAFF_CODE, to_addr=member.email)
            outbox.notify(runtime)
    flash(CODE_SENT.format(address=address))
    return redirect(url_for("staff_auth.enter_code"))


@bp.get("/staff/code/enter")
def enter_code():
    return render_template("staff/code_enter.html", email=session.get("staff_code_for", ""))


@bp.post("/staff/code/verify")
def verify_code():
    address = session.get("staff_code_for", "")
    member = find_active(address)
    entered = "".join(request.form.get("code", "").split())
    if member is None or not _take_code(member, entered):
        record(Audit.STAFF_CODE_FAILED, member, actor=address)
        return render_template("staff/code_enter.html", email=address, error=WRONG_CODE), 400
    sessions.rotate(session._get_current_object())
    session["staff_verified"] = {"member_id": member.id, "at": access.now().isoformat()}
    return redirect(url_for("staff_auth.set_password"))


@bp.route("/staff/password", methods=["GET", "POST"])
def set_password():
    member = _verified_member()
    if member is None:
        flash("Please confirm your address with a code first.")
        return redirect(url_for("staff_auth.send_code"))
    if request.method == "GET":
        return render_template("staff/password.html", email=member.email)
    password = request.form.get("password", "")
    problem = password_problem(password, member.email)
    if problem is not None:
        return render_template("staff/password.html", email=member.email, error=problem), 400
    runtime, now = access.runtime(), access.now()
    with runtime.db.atomic():
        updated = (StaffAccount.update(password_hash=hash_password(password), verified_at=now)
                   .where(StaffAccount.member == member).execute())
        if not updated:
            StaffAccount.create(member=member, password_hash=hash_password(password),
                                created_at=now, verified_at=now)
        audit.record(runtime.audit_key, Audit.STAFF_PASSWORD_SET, now, actor=member.email,
                     member=member, **access.client())
    session.pop("staff_verified", None)
    return signed_in(member, "code", now)


def _code_hash(member: Member, code: str) -> str:
    return tokens.hash_token(f"staff:{member.id}:{code}")


def _take_code(member: Member, entered: str) -> bool:
    """True when `entered` is the member's newest live code, which is then used up."""
    if len(entered) != 6 or not entered.isdigit():
        return False
    now = access.now()
    row = (StaffCode.select().where(StaffCode.member == member)
           .order_by(StaffCode.id.desc()).first())
    if row is None:
        return False
    live = ((StaffCode.id == row.id) & StaffCode.used_at.is_null()
            & (StaffCode.expires_at > now))
    taken = (StaffCode.update(attempts=StaffCode.attempts + 1)
             .where(live & (StaffCode.attempts < CODE_MAX_ATTEMPTS)).execute())
    if not taken or not hmac.compare_digest(row.code_hash, _code_hash(member, entered)):
        return False
    return bool(StaffCode.update(used_at=now).where(live).execute())


def _verified_member() -> Member | None:
    entry = session.get("staff_verified")
    if not isinstance(entry, dict):
        return None
    try:
        at = dt.datetime.fromisoformat(entry.get("at", ""))
    except (TypeError, ValueError):
        return None
    if not dt.timedelta(0) <= access.now() - at <= VERIFIED_FOR:
        return None
    member = Member.get_or_none(Member.id == entry.get("member_id"))
    return member if member is not None and member.active else None
