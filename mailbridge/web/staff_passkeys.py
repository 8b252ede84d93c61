"""Passkeys (WebAuthn, with py_webauthn) for the staff console: a signed-in member adds one;
anyone may then sign in with it — a phishing-resistant second way in beside the password.
Credentials are discoverable, so signing in needs no address: the authenticator offers the
member's passkeys for this site. The browser side is static/staff-passkey.js (no inline
script; these pages allow `script-src 'self'`)."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from flask import Blueprint, Flask, current_app, jsonify, render_template, request, session
from flask_limiter import Limiter
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url
from webauthn.helpers.exceptions import InvalidAuthenticationResponse, InvalidRegistrationResponse
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from mailbridge.store.models import Member, StaffPasskey
from mailbridge.store.states import Audit
from mailbridge.web import access
from mailbridge.web.staff_access import CSP_WITH_SCRIPT, record, require_member
from mailbridge.web.staff_auth import signed_in

bp = Blueprint("staff_passkeys", __name__)

RATE_LIMITS = {"staff_passkeys.signin_options": "20/minute", "staff_passkeys.signin": "20/minute",
               "staff_passkeys.register_passkey": "10/minute"}
MAX_CREDENTIAL_JSON = 16 * 1024


def register(app: Flask, limiter: Limiter) -> None:
    app.register_blueprint(bp)
    for endpoint, rate in RATE_LIMITS.items():
        app.view_functions[endpoint] = limiter.limit(rate)(app.view_functions[endpoint])


def _relying_party() -> tuple[str, str]:
    """The site passkeys are bound to: the host name of `[service] base_url` and its origin."""
    parts = urlsplit(access.runtime().settings.service.base_url)
    return parts.hostname or "localhost", f"{parts.scheme}://{parts.netloc}"


@bp.get("/staff/passkeys")
@require_member
def passkeys(member: Member):
    rows = list(StaffPasskey.select().where(StaffPasskey.member == member)
                .order_by(StaffPasskey.id))
    return (render_template("staff/passkeys.html", member=member, passkeys=rows,
                            passkeys_script=True), 200,
            {"Content-Security-Policy": CSP_WITH_SCRIPT})


@bp.post("/staff/passkeys/options")
@require_member
def register_options(member: Member):
    rp_id, _ = _relying_party()
    existing = StaffPasskey.select().where(StaffPasskey.member == member)
    options = generate_registration_options(
        rp_id=rp_id, rp_name="mailbridge staff console", user_name=member.email,
        user_id=f"member-{member.id}".encode(), user_display_name=member.name,
        exclude_credentials=[PublicKeyCredentialDescriptor(id=base64url_to_bytes(p.credential_id))
                             for p in existing],
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.REQUIRED,
            user_verification=UserVerificationRequirement.PREFERRED))
    session["passkey_challenge"] = bytes_to_base64url(options.challenge)
    return current_app.response_class(options_to_json(options), mimetype="application/json")


@bp.post("/staff/passkeys")
@require_member
def register_passkey(member: Member):
    credential = _credential()
    challenge = session.pop("passkey_challenge", None)
    rp_id, origin = _relying_party()
    if credential is None or not challenge:
        return jsonify(error="The passkey could not be added. Please try again."), 400
    try:
        verified = verify_registration_response(
            credential=credential, expected_challenge=base64url_to_bytes(challenge),
            expected_rp_id=rp_id, expected_origin=origin)
    except (InvalidRegistrationResponse, ValueError, KeyError, TypeError):
        return jsonify(error="The passkey could not be added. Please try again."), 400
    now = access.now()
    with access.runtime().db.atomic():
        StaffPasskey.create(member=member,
                            credential_id=bytes_to_base64url(verified.credential_id),
                            public_key=verified.credential_public_key,
                            sign_count=verified.sign_count, created_at=now)
        record(Audit.PASSKEY_ADDED, member)
    return jsonify(ok=True)


@bp.post("/staff/passkey/options")
def signin_options():
    rp_id, _ = _relying_party()
    options = generate_authentication_options(
        rp_id=rp_id, user_verification=UserVerificationRequirement.PREFERRED)
    session["passkey_challenge"] = bytes_to_base64url(options.challenge)
    return current_app.response_class(options_to_json(options), mimetype="application/json")


@bp.post("/staff/passkey/signin")
def signin():
    credential = _credential()
    challenge = session.pop("passkey_challenge", None)
    refused = jsonify(error="That passkey did not work here. Sign in with your password.")
    if credential is None or not challenge:
        return refused, 400
    passkey = StaffPasskey.get_or_none(StaffPasskey.credential_id == str(credential.get("id")))
    rp_id, origin = _relying_party()
    if passkey is None or not passkey.member.active:
        record(Audit.STAFF_SIGN_IN_FAILED, None, actor="", detail={"with": "passkey"})
        return refused, 400
    try:
        verified = verify_authentication_response(
            credential=credential, expected_challenge=base64url_to_bytes(challenge),
            expected_rp_id=rp_id, expected_origin=origin,
            credential_public_key=bytes(passkey.public_key),
            credential_current_sign_count=passkey.sign_count)
    except (InvalidAuthenticationResponse, ValueError, KeyError, TypeError):
        record(Audit.STAFF_SIGN_IN_FAILED, passkey.member, detail={"with": "passkey"})
        return refused, 400
    now = access.now()
    (StaffPasskey.update(sign_count=verified.new_sign_count, last_used_at=now)
     .where(StaffPasskey.id == passkey.id).execute())
    redirect_response = signed_in(passkey.member, "passkey", now)
    return jsonify(ok=True, next=redirect_response.location)


def _credential() -> dict | None:
    raw = request.get_data(cache=False, as_text=True)
    if not raw or len(raw) > MAX_CREDENTIAL_JSON:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
