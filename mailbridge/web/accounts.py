"""Account pages: sign in and out, a forgotten password (a single-use link by e-mail) and a
password change. No answer here reveals whether an address has an account."""

from __future__ import annotations

import datetime as dt
from urllib.parse import urlsplit

from flask import Blueprint, Flask, flash, redirect, render_template, request, session, url_for
from flask_limiter import Limiter

from mailbridge.outbound import compose, outbox
from mailbridge.runtime import Runtime
from mailbridge.store import tokens
from mailbridge.store.models import Account, PasswordReset
from mailbridge.store.states import Audit, Mail
from mailbridge.web import access, auth, sessions
from mailbridge.web.passwords import hash_password, password_problem

bp = Blueprint("accounts", __name__)

SIGN_IN_FAILED = "The address or password is not right."
RESET_MINUTES = 30
RESETS_PER_HOUR = 3  # per account; more requests get the same answer and no e-mail
MAX_ADDRESS = 320  # the column size; longer input cannot be anyone's address
# Per client IP, on POST only: showing a form costs nothing.
RATE_LIMITS = {"accounts.signin": "20/minute", "accounts.forgot": "5/minute",
               "accounts.reset": "10/minute", "accounts.change_password": "10/minute"}


def register(app: Flask, limiter: Limiter) -> None:
    app.register_blueprint(bp)
    for endpoint, rate in RATE_LIMITS.items():
        app.view_functions[endpoint] = limiter.limit(rate, methods=["POST"])(
            app.view_functions[endpoint])


def local_path(target: str | None) -> str | None:
    """`target` if it is a path on this site, else None: never an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return None
    # Browsers treat "\" like "/" and drop tabs and newlines, so "/\evil" would leave the site.
    if any(ch == "\\" or ord(ch) < 0x21 or ord(ch) == 0x7F for ch in target):
        return None
    parts = urlsplit(target)
    return None if parts.scheme or parts.netloc else target


def _address(field: str = "email") -> str:
    return request.form.get(field, "").strip().lower()[:MAX_ADDRESS]


def _signed_in_response(runtime: Runtime, account: Account, target: str,
                        notice: str | None = None):
    """Signed in afresh (a new session id) and remembered on this device, so a flood of
    failures against the address cannot lock its owner out (see auth)."""
    sessions.sign_in(session, account, runtime.clock())
    if notice:
        flash(notice)  # after sign_in, which empties the session
    response = redirect(target)
    response.set_cookie(auth.DEVICE_COOKIE, auth.device_cookie_value(runtime, account),
                        max_age=auth.DEVICE_COOKIE_DAYS * 86400, path="/", httponly=True,
                        samesite="Lax",
                        secure=runtime.settings.service.base_url.startswith("https://"))
    return response


# --- sign in and out -------------------------------------------------------------------------


@bp.route("/signin", methods=["GET", "POST"])
def signin():
    if request.method == "GET":
        return render_template("signin.html", next=local_path(request.args.get("next")))
    target = local_path(request.form.get("next"))
    runtime = access.runtime()
    result = auth.authenticate(runtime, _address(), request.form.get("password", ""))
    if isinstance(result, auth.Throttled):
        return render_template("signin.html", next=target, error=result.message), 429
    if result is None:
        # The address is not echoed back: the page must be the same with or without an account.
        return render_template("signin.html", next=target, error=SIGN_IN_FAILED), 400
    return _signed_in_response(runtime, result, target or url_for("library.index"))


@bp.post("/signout")
def signout():
    account = access.current_account()
    sessions.sign_out(session, access.now())
    if account is not None:
        access.record(Audit.SIGNED_OUT, actor=account.email, account=account)
    flash("You are signed out.")
    return redirect(url_for("accounts.signin"))


# --- forgotten password ----------------------------------------------------------------------


@bp.route("/forgot", methods=["GET", "POST"])
def forgot():
    if request.method == "GET":
        return render_template("forgot.html", sent=False)
    runtime = access.runtime()
    address = _address()
    account = Account.get_or_none(Account.email == address) if address else None
    token = tokens.new_link_token()
    # Rendered either way so both answers take about as long.
    message = compose.reset_email(
        runtime.settings, to=account.email if account else runtime.settings.outbound.from_,
        reset_url=f"{runtime.settings.service.base_url.rstrip('/')}/reset/{token}",
        minutes=RESET_MINUTES, now=runtime.clock())
    if account is not None:
        _queue_reset(runtime, account, token, message)
    return render_template("forgot.html", sent=True)


def _queue_reset(runtime: Runtime, account: Account, token: str, message) -> None:
    now = runtime.clock()
    hour_ago = now - dt.timedelta(hours=1)
    recent = (PasswordReset.select().where((PasswordReset.account == account)
                                           & (PasswordReset.created_at > hour_ago)).count())
    with runtime.db.atomic():
        if recent >= RESETS_PER_HOUR:
            access.record(Audit.PASSWORD_RESET_REQUESTED, actor=account.email, account=account,
                          detail={"sent": False, "reason": "too_many"})
            return
        PasswordReset.create(account=account, token_hash=tokens.hash_token(token),
                             created_at=now, expires_at=now + dt.timedelta(minutes=RESET_MINUTES))
        outbox.enqueue(runtime, message, kind=Mail.RESET, to_addr=account.email)
        access.record(Audit.PASSWORD_RESET_REQUESTED, actor=account.email, account=account,
                      detail={"sent": True})
    outbox.notify(runtime)


def _usable_reset(token: str, now: dt.datetime) -> PasswordReset | None:
    if len(token) > 64:
        return None
    return (PasswordReset.select().where((PasswordReset.token_hash == tokens.hash_token(token))
                                         & PasswordReset.used_at.is_null()
                                         & (PasswordReset.expires_at > now)).first())


@bp.route("/reset/<token>", methods=["GET", "POST"])
def reset(token: str):
    runtime = access.runtime()
    now = runtime.clock()
    row = _usable_reset(token, now)
    if row is None:
        return render_template("reset.html", valid=False), 404
    account = row.account
    if request.method == "GET":  # mail scanners fetch links: showing the form uses nothing
        return render_template("reset.html", valid=True, address=account.email)
    new_password = request.form.get("new_password", "")
    problem = password_problem(new_password, account.email)
    if problem:
        return render_template("reset.html", valid=True, address=account.email,
                               error=problem), 400
    new_hash = hash_password(new_password)  # slow: outside the transaction
    with runtime.db.atomic():
        # Conditional, so two submissions of one link cannot both succeed.
        used = (PasswordReset.update(used_at=now)
                .where((PasswordReset.id == row.id) & PasswordReset.used_at.is_null()
                       & (PasswordReset.expires_at > now)).execute())
        if used:
            Account.update(password_hash=new_hash).where(Account.id == account.id).execute()
            # Any other link still in a mailbox is void too.
            (PasswordReset.update(used_at=now).where((PasswordReset.account == account)
                                                    & PasswordReset.used_at.is_null()).execute())
            ended = sessions.end_all_sessions(account, now)
            access.record(Audit.PASSWORD_RESET, actor=account.email, account=account,
                          detail={"sessions_ended": ended})
    if not used:
        return render_template("reset.html", valid=False), 404
    return _signed_in_response(
        runtime, account, url_for("library.index"),
        notice="Your new password is set. Every other session of this account was signed out.")


# --- changing the password -------------------------------------------------------------------


@bp.route("/account/password", methods=["GET", "POST"])
@access.require_account
def change_password():
    if request.method == "GET":
        return render_template("change_password.html")
    runtime = access.runtime()
    account = access.current_account()
    current = request.form.get("password", "")
    new_password = request.form.get("new_password", "")
    # Through authenticate, so guessing the current password here is throttled like sign-in.
    result = auth.authenticate(runtime, account.email, current)
    if isinstance(result, auth.Throttled):
        return render_template("change_password.html", error=result.message), 429
    if result is None:
        return render_template("change_password.html",
                               error="Your current password is not right."), 400
    problem = password_problem(new_password, account.email)
    if problem is None and new_password == current:
        problem = "Choose a password different from the current one."
    if problem:
        return render_template("change_password.html", error=problem), 400
    new_hash = hash_password(new_password)
    now = runtime.clock()
    with runtime.db.atomic():
        Account.update(password_hash=new_hash).where(Account.id == account.id).execute()
        ended = sessions.end_all_sessions(account, now, except_row=session.row)
        access.record(Audit.PASSWORD_CHANGED, actor=account.email, account=account,
                      detail={"sessions_ended": ended})
    flash("Your password was changed. Every other session of this account was signed out.")
    return redirect(url_for("accounts.change_password"))
