"""The link flow: `/s/<token>` shows what was shared; its Continue button (a POST, see
`link_actions`) leads to `/s/<token>/next`: proving the mailbox with an e-mailed code, creating
an account (or signing in) and claiming.

GETs only show — mail scanners and link previews fetch links — and every change is a POST
with a CSRF token. A link works only for the address it was sent to.
"""

from __future__ import annotations

import datetime as dt
import functools
import hmac
import secrets

from flask import (
    Blueprint,
    Flask,
    Response,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_limiter import Limiter

from mailbridge.clock import local_text
from mailbridge.outbound import compose, outbox
from mailbridge.shares import clinics
from mailbridge.shares.lifecycle import effective_state
from mailbridge.store import tokens
from mailbridge.store.models import Account, AuditEvent, Grant, OneTimeCode
from mailbridge.store.states import Audit, GrantState, Mail
from mailbridge.web import access, auth, sessions
from mailbridge.web.access import current_account
from mailbridge.web.passwords import password_problem

bp = Blueprint("links", __name__)

MAX_TOKEN = 64
CODE_DIGITS = 6
CODE_MINUTES = 10
CODE_MAX_ATTEMPTS = 5
CODES_PER_WINDOW, CODE_WINDOW = 3, dt.timedelta(minutes=15)
VERIFIED_FOR = dt.timedelta(minutes=15)  # from a right code to the chosen password
LINK_VIEW_WINDOW = dt.timedelta(hours=1)

# Per IP. Link lookups are limited for every request, so guessing tokens is slow.
LIMITS = {"link_page": "30/minute", "next_step": "30/minute", "send_code": "5/minute",
          "verify_code": "10/minute", "register": "10/minute", "signin": "10/minute",
          "claim": "10/minute"}

WRONG_CODE = "That code is not right. Check the e-mail and try again."
DEAD_CODE = "That code can no longer be used. Please ask for a new code."
EXPIRED_CODE = "The code has expired. Please ask for a new code."
USED_CODE = "That code was already used. Please ask for a new code."
NO_CODE = "Please ask for a code first."
MALFORMED_CODE = f"Enter the {CODE_DIGITS} digits from the e-mail."
CODE_LIMIT = ("We just sent you a code. Check your inbox (and spam folder), or wait a few "
              "minutes before asking for another.")
NOT_RIGHT = "The password is not right."
ACCOUNT_EXISTS = "You already have an account for this address. Please sign in."


def register(app: Flask, limiter: Limiter) -> None:
    app.register_blueprint(bp)
    for name, limit in LIMITS.items():
        endpoint = f"links.{name}"
        app.view_functions[endpoint] = limiter.limit(limit)(app.view_functions[endpoint])


def link_step(*, allow_expired: bool = False):
    """For the views of a link's flow: the view gets the grant of `token` when the flow may go
    on with it; otherwise it is not called and the holder sees why (no such link, another
    account signed in, or the grant no longer pending — expired ones pass when
    `allow_expired`)."""

    def decorate(view):
        @functools.wraps(view)
        def checked(token: str):
            grant = find(token)
            if grant is None:
                return not_found()
            refusal = _refusal(grant, allow_expired=allow_expired)
            if refusal is not None:
                return refusal
            return view(grant, token)

        return checked

    return decorate


# --- pages -----------------------------------------------------------------------------------


@bp.route("/s/<token>", methods=["GET", "HEAD"])
def link_page(token: str):
    grant = find(token)
    if grant is None:
        return not_found()
    state = effective_state(grant, access.now())
    if request.method == "GET" and not _shown_lately(grant):
        access.record(Audit.LINK_SHOWN, share=grant.share_id, grant=grant, detail={"state": state})
    return state_page(grant, state)


@bp.get("/s/<token>/next")
@link_step()
def next_step(grant: Grant, token: str):
    return _show(grant, _step_template(grant))


# --- actions ---------------------------------------------------------------------------------


@bp.post("/s/<token>/code")
@link_step()
def send_code(grant: Grant, token: str):
    if current_account() is not None or _has_account(grant):
        return _to_next(token)  # a code would not help: they sign in or claim
    runtime, now = access.runtime(), access.now()
    recent = (OneTimeCode.select().where((OneTimeCode.grant == grant)
                                         & (OneTimeCode.created_at > now - CODE_WINDOW)).count())
    if recent >= CODES_PER_WINDOW:
        _remember_code_sent(grant)
        return _show(grant, "link_enter_code.html", notice=CODE_LIMIT, status=429)
    code = f"{secrets.randbelow(10 ** CODE_DIGITS):0{CODE_DIGITS}d}"
    msg = compose.code_email(runtime.settings, to=grant.address, code=code,
                             minutes=CODE_MINUTES, now=now)
    with runtime.db.atomic():
        # Only the newest code counts: older unused ones stop working now.
        (OneTimeCode.update(expires_at=now)
         .where((OneTimeCode.grant == grant) & OneTimeCode.used_at.is_null()
                & (OneTimeCode.expires_at > now)).execute())
        OneTimeCode.create(grant=grant, code_hash=_code_hash(grant, code), created_at=now,
                           expires_at=now + dt.timedelta(minutes=CODE_MINUTES))
        access.record(Audit.CODE_SENT, actor=grant.address, share=grant.share_id, grant=grant)
        outbox.enqueue(runtime, msg, kind=Mail.CODE, to_addr=grant.address, share=grant.share_id,
                       grant=grant)
    outbox.notify(runtime)
    _remember_code_sent(grant)
    flash(f"We sent a code to {grant.address}. It works for {CODE_MINUTES} minutes.")
    return _to_next(token)


@bp.post("/s/<token>/verify")
@link_step()
def verify_code(grant: Grant, token: str):
    if current_account() is not None:
        return _to_next(token)
    problem = _check_code(grant, request.form.get("code", ""))
    if problem is not None:
        return _show(grant, "link_enter_code.html", error=problem, status=400)
    # A proven mailbox is worth stealing: it gets a session identity of its own.
    sessions.rotate(session._get_current_object())
    session["verified"] = {"grant_id": grant.id, "address": grant.address,
                           "at": access.now().isoformat()}
    return _to_next(token)


@bp.post("/s/<token>/register", endpoint="register")
@link_step(allow_expired=True)
def register_account(grant: Grant, token: str):
    # An expired grant still lets a proven mailbox get its account; only the claim fails.
    if current_account() is not None:
        return _to_next(token)
    if not _verified(grant):
        flash("Please confirm your address with a new code first.")
        return _to_next(token)
    if _has_account(grant):
        return _show(grant, "link_signin.html", notice=ACCOUNT_EXISTS)
    password = request.form.get("password", "")
    problem = password_problem(password, grant.address)
    if problem is not None:
        return _show(grant, "link_set_password.html", error=problem, status=400)
    runtime = access.runtime()
    try:
        account = auth.create_account(runtime, grant.address, password)
    except auth.AccountExists:
        return _show(grant, "link_signin.html", notice=ACCOUNT_EXISTS)
    return _sign_in_and_claim(grant, account)


@bp.post("/s/<token>/signin")
@link_step()
def signin(grant: Grant, token: str):
    if current_account() is not None:
        return _to_next(token)
    result = auth.authenticate(access.runtime(), grant.address, request.form.get("password", ""))
    if isinstance(result, auth.Throttled):
        return _show(grant, "link_signin.html", error=result.message, status=429)
    if result is None:
        return _show(grant, "link_signin.html", error=NOT_RIGHT, forgot=True, status=400)
    return _sign_in_and_claim(grant, result)


@bp.post("/s/<token>/claim")
@link_step()
def claim(grant: Grant, token: str):
    account = current_account()
    if account is None:
        return _to_next(token)
    return _claimed_or_state(grant, account)


# --- the pieces ------------------------------------------------------------------------------


def find(token: str) -> Grant | None:
    if len(token) > MAX_TOKEN:
        return None
    return Grant.get_or_none(Grant.token_hash == tokens.hash_token(token))


def _shown_lately(grant: Grant) -> bool:
    """Was the link page shown to this client (IP and user agent) in the last hour? Repeated
    views (reloads, a scanner's retries) are one audit event an hour, not a row each."""
    who = access.client()
    return (AuditEvent.select().where(
        (AuditEvent.grant == grant) & (AuditEvent.kind == Audit.LINK_SHOWN)
        & (AuditEvent.at > access.now() - LINK_VIEW_WINDOW)
        & (AuditEvent.ip == who["ip"]) & (AuditEvent.user_agent == who["user_agent"]))
        .exists())


def not_found():
    # One page for every bad token: nothing tells a guesser how close it came.
    return render_template("link_unknown.html"), 404


def _refusal(grant: Grant, *, allow_expired: bool = False):
    """The response when this grant cannot go on with the flow, else None: another account is
    signed in, or the grant is no longer pending."""
    account = current_account()
    if account is not None and account.email != grant.address.lower():
        access.record(Audit.ACCESS_DENIED, actor=account.email, account=account,
                      share=grant.share_id, grant=grant, detail={"reason": "wrong_account"})
        return render_template("link_wrong_account.html"), 403
    state = effective_state(grant, access.now())
    if state == GrantState.PENDING or (state == GrantState.EXPIRED and allow_expired):
        return None
    if state == GrantState.CLAIMED and account is not None and grant.account_id == account.id:
        return redirect(url_for("library.index"))
    return state_page(grant, state)


def state_page(grant: Grant, state: str, **extra):
    share = grant.share
    rules = clinics.policy(share.clinic, access.runtime().settings)
    return render_template(
        "link.html", state=state, token=_token_arg(),
        clinic=share.clinic.name, sender=share.sender.name, documents=share.documents.count(),
        deadline=local_text(grant.deadline, share.clinic.timezone), contact=rules.contact,
        **extra)


def _token_arg() -> str:
    return request.view_args["token"]


def _step_template(grant: Grant) -> str:
    """Which form a pending grant's holder sees next (not signed in as someone else)."""
    if current_account() is not None:
        return "link_claim.html"
    if _has_account(grant):
        return "link_signin.html"
    if _verified(grant):
        return "link_set_password.html"
    if grant.id in session.get("codes_sent", []):
        return "link_enter_code.html"
    return "link_send_code.html"


def _show(grant: Grant, template: str, *, status: int = 200, **extra):
    # What the holder of the link may see: never titles, filenames or notes.
    share = grant.share
    return render_template(
        template, token=_token_arg(), address=grant.address, clinic=share.clinic.name,
        sender=share.sender.name, documents=share.documents.count(),
        deadline=local_text(grant.deadline, share.clinic.timezone),
        code_minutes=CODE_MINUTES, **extra), status


def _to_next(token: str):
    return redirect(url_for("links.next_step", token=token))


def _has_account(grant: Grant) -> bool:
    return Account.select().where(Account.email == grant.address.lower()).exists()


def _code_hash(grant: Grant, code: str) -> str:
    # Bound to the grant: a code sent for one link proves nothing for another.
    return tokens.hash_token(f"{grant.id}:{code}")


def _remember_code_sent(grant: Grant) -> None:
    sent = [grant_id for grant_id in session.get("codes_sent", []) if grant_id != grant.id]
    session["codes_sent"] = [*sent, grant.id][-10:]


def _check_code(grant: Grant, entered: str) -> str | None:
    """None when `entered` is the grant's newest code (which is then used up), else why not."""
    entered = "".join(entered.split())
    if len(entered) != CODE_DIGITS or not entered.isascii() or not entered.isdigit():
        return MALFORMED_CODE  # cannot be right; not counted as a guess
    runtime, now = access.runtime(), access.now()
    row = (OneTimeCode.select().where(OneTimeCode.grant == grant)
           .order_by(OneTimeCode.id.desc()).first())
    if row is None:
        return NO_CODE
    if row.used_at is not None:
        return USED_CODE
    if row.expires_at <= now:
        return EXPIRED_CODE
    # Take the try before comparing, so parallel guesses cannot exceed the allowance.
    live = ((OneTimeCode.id == row.id) & OneTimeCode.used_at.is_null()
            & (OneTimeCode.expires_at > now))
    taken = (OneTimeCode.update(attempts=OneTimeCode.attempts + 1)
             .where(live & (OneTimeCode.attempts < CODE_MAX_ATTEMPTS)).execute())
    if not taken:
        return DEAD_CODE
    if not hmac.compare_digest(row.code_hash, _code_hash(grant, entered)):
        attempts = OneTimeCode.get_by_id(row.id).attempts
        access.record(Audit.CODE_FAILED, actor=grant.address, share=grant.share_id, grant=grant,
                      detail={"attempts": attempts})
        return DEAD_CODE if attempts >= CODE_MAX_ATTEMPTS else WRONG_CODE
    with runtime.db.atomic():
        # Conditional: of two submissions of the same code only one uses it.
        used = OneTimeCode.update(used_at=now).where(live).execute()
        if used:
            access.record(Audit.CODE_VERIFIED, actor=grant.address, share=grant.share_id,
                          grant=grant)
    return None if used else USED_CODE


def _verified(grant: Grant) -> bool:
    """A right code for this grant was entered in this session within VERIFIED_FOR."""
    entry = session.get("verified")
    if not isinstance(entry, dict) or entry.get("grant_id") != grant.id \
            or entry.get("address") != grant.address:
        return False
    try:
        at = dt.datetime.fromisoformat(entry.get("at", ""))
    except (TypeError, ValueError):
        return False
    return dt.timedelta(0) <= access.now() - at <= VERIFIED_FOR


def _sign_in_and_claim(grant: Grant, account: Account) -> Response:
    runtime = access.runtime()
    sessions.sign_in(session._get_current_object(), account, access.now())
    response = make_response(_claimed_or_state(grant, account))
    response.set_cookie(auth.DEVICE_COOKIE, auth.device_cookie_value(runtime, account),
                        max_age=int(dt.timedelta(days=auth.DEVICE_COOKIE_DAYS).total_seconds()),
                        httponly=True, samesite="Lax", path="/",
                        secure=runtime.settings.service.base_url.startswith("https://"))
    return response


def _claimed_or_state(grant: Grant, account: Account):
    """Claim before the deadline and go to the library; otherwise say why not."""
    if auth.claim_grant(access.runtime(), grant, account):
        flash(f"The documents from {grant.share.sender.name} are now in your library.")
        return redirect(url_for("library.index"))
    fresh = Grant.get_by_id(grant.id)
    return state_page(fresh, effective_state(fresh, access.now()))
