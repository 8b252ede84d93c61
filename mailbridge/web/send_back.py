""""Send documents back" in the library: the upload form on a claimed share and its POST, which
hands the files to `shares.send_back` (intake's type and size rules, encryption, the sender's
e-mail). Every refusal is a page saying what was wrong; nothing is stored half."""

from __future__ import annotations

import io

from flask import Blueprint, Flask, flash, redirect, render_template, request, url_for
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_wtf.csrf import validate_csrf
from werkzeug.exceptions import RequestEntityTooLarge
from wtforms.validators import ValidationError

from mailbridge.settings import Settings
from mailbridge.shares import send_back as domain
from mailbridge.store import sealed
from mailbridge.store.models import Grant
from mailbridge.web import access
from mailbridge.web.access import current_account, require_account

bp = Blueprint("send_back", __name__)

# Per signed-in account (its sessions together), so a new session does not reset it.
RATE_LIMIT = "10/hour;30/day"
# At most this many files in one upload; each is checked like an e-mail attachment.
MAX_FILES = 20
# Room for the form's own fields and multipart boundaries on top of the files.
FORM_OVERHEAD = 64 * 1024


def largest_request_body(settings: Settings) -> int:
    """The largest request body the portal takes: one upload at intake's message limit."""
    return settings.smtp.max_message_bytes + FORM_OVERHEAD


def register(app: Flask, limiter: Limiter) -> None:
    app.register_blueprint(bp)
    # The POST checks its CSRF token itself, after raising the body limit for this one form:
    # the global check would read the body under the portal's 64 KB form limit first.
    app.extensions["csrf"].exempt("mailbridge.web.send_back.upload")
    endpoint = "send_back.upload"
    app.view_functions[endpoint] = limiter.limit(
        RATE_LIMIT, key_func=_rate_key)(app.view_functions[endpoint])


def _rate_key() -> str:
    account = current_account()
    return f"send-back:{account.id}" if account else f"send-back-ip:{get_remote_address()}"


def _grant(share_id: int) -> Grant:
    """The account's own grant for the share (claimed or not any more); anyone else's share,
    or documents that were themselves sent back, get the audited 404."""
    account = current_account()
    grant = (Grant.select().where((Grant.account == account) & (Grant.share == share_id))
             .order_by(Grant.id.desc()).first())
    if grant is None or domain.is_sent_back(share_id):
        access.refuse(account, share_id, share=share_id)
    return grant


def _form(grant: Grant, *, error: str = "", status: int = 200):
    runtime = access.runtime()
    limits = runtime.settings.limits
    share = grant.share
    return render_template(
        "send_back.html", grant=grant, share=share, error=error,
        title=sealed.share_title(runtime.phi_key, share), sender=share.sender.name,
        clinic=share.clinic.name, types=", ".join(k.upper() for k in limits.allowed_types),
        per_file=domain.mb(limits.max_file_bytes), total=domain.mb(limits.max_total_bytes),
        max_files=MAX_FILES, max_message=domain.MAX_MESSAGE_CHARS), status


def _ended(grant: Grant, refused: domain.Refused):
    return render_template("error.html", title="Documents can no longer be sent back",
                           message=refused.message), 410


@bp.get("/library/shares/<int:share_id>/send-back")
@require_account
def form(share_id: int):
    grant = _grant(share_id)
    refused = domain.refusal(grant)
    if refused is not None:
        return _ended(grant, refused)
    return _form(grant)


@bp.post("/library/shares/<int:share_id>/send-back")
@require_account
def upload(share_id: int):
    grant = _grant(share_id)
    runtime = access.runtime()
    client = access.client()
    limit = runtime.settings.smtp.max_message_bytes
    request.max_content_length = largest_request_body(runtime.settings)
    # Keep uploaded files in memory (bounded by the limit above): werkzeug would spool large
    # ones to an unencrypted temporary file, and documents are only ever at rest encrypted.
    request._get_file_stream = lambda *args, **kwargs: io.BytesIO()
    try:
        files = request.files.getlist("files")
        message = request.form.get("message", "")
        token = request.form.get("csrf_token", "")
    except RequestEntityTooLarge:
        refused = domain.Refused("too_large_request", "What was sent is larger than the "
                                 f"limit of {domain.mb(limit)} for one upload.")
        domain.record_refusal(runtime, grant, refused, **client)
        return _form(grant, error=refused.message, status=413)
    try:
        validate_csrf(token)
    except ValidationError:
        return render_template("error.html", title="This form has expired",
                               message="Please go back, reload the page and try again."), 400
    refused = domain.refusal(grant)
    if refused is not None:
        domain.record_refusal(runtime, grant, refused, **client)
        return _ended(grant, refused)
    checked = domain.check_files([(f.filename or "", f.read()) for f in files],
                                 runtime.settings.limits, MAX_FILES)
    if isinstance(checked, domain.Refused):
        domain.record_refusal(runtime, grant, checked, **client)
        return _form(grant, error=checked.message, status=400)
    result = domain.send_back(runtime, grant, checked, message, **client)
    if isinstance(result, domain.Refused):
        return _ended(grant, result)
    count = len(checked)
    flash(f"{count} document{'' if count == 1 else 's'} sent to {grant.share.sender.name}. "
          "They have been told by e-mail.")
    return redirect(url_for("library.index"))

