"""Account pages: signing in and out, throttling that cannot lock the owner out, a forgotten
password by single-use link, and changing the password."""

from __future__ import annotations

import email
import email.policy
import re
from urllib.parse import urlsplit

from mailbridge.outbound import outbox
from mailbridge.store import audit, tokens
from mailbridge.store.models import Account, AuditEvent, OutboundMessage, PasswordReset, WebSession
from mailbridge.web import auth
from mailbridge.web.passwords import verify_password
from tests.portal_helpers import (
    OWNER,
    PASSWORD,
    csrf,
    sign_in,
    without_csrf,
)

NEW_PASSWORD = "maple lantern orbit seven"


def is_signed_in(client) -> bool:
    return client.get("/account/password").status_code == 200


def attempt(client, token: str, address: str, password: str, ip: str, **fields):
    return client.post("/signin", data={"csrf_token": token, "email": address,
                                        "password": password, **fields},
                       environ_overrides={"REMOTE_ADDR": ip})


def kinds(kind: str) -> int:
    return AuditEvent.select().where(AuditEvent.kind == kind).count()


# --- sign in and out -------------------------------------------------------------------------


def test_sign_in_then_out(owner_portal):
    _, app = owner_portal
    client = app.test_client()
    form = client.get("/signin").get_data(as_text=True)
    assert 'name="email"' in form and 'autocomplete="current-password"' in form
    assert not is_signed_in(client)

    response = sign_in(client, OWNER)
    assert response.status_code == 302 and urlsplit(response.location).path == "/library"
    assert is_signed_in(client)
    assert client.get_cookie(auth.DEVICE_COOKIE) is not None
    assert kinds("signed_in") == 1

    token = csrf(client, "/account/password")
    out = client.post("/signout", data={"csrf_token": token})
    assert out.status_code == 302 and urlsplit(out.location).path == "/signin"
    assert "You are signed out" in client.get("/signin").get_data(as_text=True)
    assert not is_signed_in(client)
    assert kinds("signed_out") == 1


def test_failure_is_identical_for_unknown_address_and_wrong_password(owner_portal):
    _, app = owner_portal
    wrong, unknown = app.test_client(), app.test_client()
    a = attempt(wrong, csrf(wrong, "/signin"), OWNER, "not the password at all", "10.0.0.1")
    b = attempt(unknown, csrf(unknown, "/signin"), "nobody@else.example", PASSWORD, "10.0.0.1")
    assert a.status_code == b.status_code == 400
    assert "The address or password is not right." in a.get_data(as_text=True)
    assert without_csrf(a) == without_csrf(b)
    assert kinds("sign_in_failed") == 2 and kinds("signed_in") == 0
    assert not is_signed_in(wrong) and not is_signed_in(unknown)


def test_next_never_leaves_the_site(owner_portal):
    _, app = owner_portal
    client = app.test_client()
    for target in ("//evil.example", "https://evil.example/library", "/\\evil.example",
                   "/\t/evil.example", "javascript:alert(1)", "library"):
        form = client.get("/signin", query_string={"next": target}).get_data(as_text=True)
        assert 'name="next"' not in form
        response = attempt(client, csrf(client, "/signin"), OWNER, PASSWORD, "10.0.0.1",
                           next=target)
        assert response.status_code == 302
        location = urlsplit(response.location)
        assert location.netloc in ("", "localhost") and location.path == "/library", target


def test_next_brings_back_to_a_local_page(owner_portal):
    _, app = owner_portal
    client = app.test_client()
    first = client.get("/account/password")
    assert first.status_code == 302 and urlsplit(first.location).path == "/signin"
    form = client.get(first.location).get_data(as_text=True)
    assert 'name="next" value="/account/password"' in form
    response = attempt(client, csrf(client, "/signin"), OWNER, PASSWORD, "10.0.0.1",
                       next="/account/password")
    assert response.location == "/account/password"


# --- throttling ------------------------------------------------------------------------------


def test_five_failures_throttle_that_address_from_that_ip_only(owner_portal):
    rt, app = owner_portal
    attacker = app.test_client()
    token = csrf(attacker, "/signin")
    for _ in range(5):
        assert attempt(attacker, token, OWNER, "guess guess guess", "10.0.0.1").status_code == 400
    blocked = attempt(attacker, token, OWNER, PASSWORD, "10.0.0.1")
    assert blocked.status_code == 429 and "Too many attempts" in blocked.get_data(as_text=True)
    assert not is_signed_in(attacker)

    owner = app.test_client()
    assert attempt(owner, csrf(owner, "/signin"), OWNER, PASSWORD, "10.0.0.2").status_code == 302

    rt.clock.advance(minutes=16)
    token = csrf(attacker, "/signin")  # the anonymous session has idled out meanwhile
    assert attempt(attacker, token, OWNER, PASSWORD, "10.0.0.1").status_code == 302


def earlier_failures(rt, count: int, *, address=None, ip=None) -> None:
    """Failed sign-ins as earlier requests left them (each real one costs an argon2 check)."""
    audit.record_many(rt.audit_key, [
        dict(kind="sign_in_failed", at=rt.clock(), actor=address or f"person{n}@else.example",
             ip=ip or f"10.9.0.{n}") for n in range(count)])


def test_one_ip_trying_many_addresses_is_throttled(owner_portal):
    rt, app = owner_portal
    client = app.test_client()
    token = csrf(client, "/signin")
    earlier_failures(rt, auth.PER_IP - 1, ip="10.0.0.1")
    assert attempt(client, token, "last@else.example", "guess", "10.0.0.1").status_code == 400
    assert attempt(client, token, OWNER, PASSWORD, "10.0.0.1").status_code == 429
    assert attempt(client, token, OWNER, PASSWORD, "10.0.0.2").status_code == 302


def test_rate_limit_on_sign_in_posts_per_ip(owner_portal):
    rt, app = owner_portal
    client = app.test_client()
    token = csrf(client, "/signin")
    # This pair is throttled already, so these 20 posts are quick; the limiter counts them.
    earlier_failures(rt, auth.PER_PAIR, address="x@else.example", ip="10.0.0.1")
    for _ in range(20):
        assert attempt(client, token, "x@else.example", "guess", "10.0.0.1").status_code == 429
    limited = attempt(client, token, OWNER, PASSWORD, "10.0.0.1")
    assert limited.status_code == 429
    assert "wait a few minutes" in limited.get_data(as_text=True)
    assert client.get("/signin", environ_overrides={"REMOTE_ADDR": "10.0.0.1"}).status_code == 200
    assert attempt(client, token, OWNER, PASSWORD, "10.0.0.2").status_code == 302


def test_account_wide_throttle_spares_the_owners_browser(owner_portal):
    rt, app = owner_portal
    owner = app.test_client()
    assert sign_in(owner, OWNER).status_code == 302  # this browser now carries the device cookie
    owner.post("/signout", data={"csrf_token": csrf(owner, "/account/password")})

    earlier_failures(rt, auth.PER_ACCOUNT - 1, address=OWNER)
    attacker = app.test_client()
    token = csrf(attacker, "/signin")
    assert attempt(attacker, token, OWNER, "guess", "10.1.0.1").status_code == 400
    stranger = app.test_client()
    assert attempt(stranger, csrf(stranger, "/signin"), OWNER, PASSWORD,
                   "10.2.0.1").status_code == 429
    assert attempt(owner, csrf(owner, "/signin"), OWNER, PASSWORD, "10.2.0.2").status_code == 302
    assert is_signed_in(owner)


# --- forgotten password ----------------------------------------------------------------------


def request_reset(client, address: str, ip: str = "10.0.0.1"):
    return client.post("/forgot", data={"csrf_token": csrf(client, "/forgot"), "email": address},
                       environ_overrides={"REMOTE_ADDR": ip})


def reset_token(rt) -> str:
    """The token from the newest reset e-mail, read as the recipient would."""
    row = (OutboundMessage.select().where(OutboundMessage.kind == "reset")
           .order_by(OutboundMessage.id.desc()).first())
    message = email.message_from_bytes(outbox.open_message(rt, row), policy=email.policy.default)
    body = message.get_body(("plain",)).get_content()
    return re.search(r"http://portal\.example/reset/(\S+)", body).group(1)


def test_forgot_gives_one_answer_and_mails_only_an_account(owner_portal):
    rt, app = owner_portal
    client = app.test_client()
    known = request_reset(client, OWNER.upper())
    unknown = request_reset(client, "nobody@else.example")
    assert known.status_code == unknown.status_code == 200
    assert without_csrf(known) == without_csrf(unknown)
    assert "If an account exists for that address" in known.get_data(as_text=True)

    mails = list(OutboundMessage.select())
    assert [(m.kind, m.to_addr) for m in mails] == [("reset", OWNER)]
    assert rt.wake_dispatcher.is_set()
    token = reset_token(rt)
    row = PasswordReset.get()
    assert row.token_hash == tokens.hash_token(token) and token not in row.token_hash
    assert (row.expires_at - row.created_at).total_seconds() == 30 * 60
    assert kinds("password_reset_requested") == 1


def test_reset_link_works_once_and_signs_out_everywhere_else(owner_portal):
    rt, app = owner_portal
    other = app.test_client()
    sign_in(other, OWNER)
    client = app.test_client()
    request_reset(client, OWNER)
    token = reset_token(rt)

    for _ in range(2):  # a mail scanner opening the link uses nothing up
        page = client.get(f"/reset/{token}")
        assert page.status_code == 200 and 'name="new_password"' in page.get_data(as_text=True)
    form_token = csrf(client, f"/reset/{token}")
    weak = client.post(f"/reset/{token}", data={"csrf_token": form_token,
                                                "new_password": "password1234"})
    assert weak.status_code == 400 and "too common" in weak.get_data(as_text=True)

    done = client.post(f"/reset/{token}", data={"csrf_token": form_token,
                                                "new_password": NEW_PASSWORD})
    assert done.status_code == 302 and urlsplit(done.location).path == "/library"
    assert "Your new password is set" in client.get(done.location).get_data(as_text=True)
    assert is_signed_in(client) and not is_signed_in(other)
    assert verify_password(Account.get().password_hash, NEW_PASSWORD)
    assert kinds("password_reset") == 1

    again = client.post(f"/reset/{token}", data={"csrf_token": csrf(client, "/account/password"),
                                                 "new_password": "another fine passphrase"})
    text = again.get_data(as_text=True)
    assert again.status_code == 404 and "expired or was already used" in text
    assert 'href="/forgot"' in text
    assert verify_password(Account.get().password_hash, NEW_PASSWORD)

    fresh = app.test_client()
    assert sign_in(fresh, OWNER).status_code == 400
    assert sign_in(fresh, OWNER, NEW_PASSWORD).status_code == 302


def test_reset_link_expires_after_30_minutes(owner_portal):
    rt, app = owner_portal
    client = app.test_client()
    request_reset(client, OWNER)
    token = reset_token(rt)
    rt.clock.advance(minutes=30, seconds=1)
    page = client.get(f"/reset/{token}")
    assert page.status_code == 404 and "expired" in page.get_data(as_text=True)
    late = client.post(f"/reset/{token}", data={"csrf_token": csrf(client, "/forgot"),
                                                "new_password": NEW_PASSWORD})
    assert late.status_code == 404
    assert verify_password(Account.get().password_hash, PASSWORD)


def test_at_most_three_reset_mails_an_hour_and_five_requests_a_minute(owner_portal):
    rt, app = owner_portal
    client = app.test_client()
    answers = {without_csrf(request_reset(client, OWNER)) for _ in range(4)}
    assert len(answers) == 1
    assert OutboundMessage.select().count() == 3
    assert without_csrf(request_reset(client, "nobody@else.example")) in answers
    assert request_reset(client, OWNER).status_code == 429  # sixth from this IP this minute

    rt.clock.advance(minutes=61)
    assert request_reset(client, OWNER, ip="10.0.0.2").status_code == 200
    assert OutboundMessage.select().count() == 4


# --- changing the password -------------------------------------------------------------------


def change(client, current: str, new: str, ip: str = "127.0.0.1"):
    return client.post("/account/password",
                       data={"csrf_token": csrf(client, "/account/password"),
                             "password": current, "new_password": new},
                       environ_overrides={"REMOTE_ADDR": ip})


def test_change_password_checks_the_current_one_and_ends_other_sessions(owner_portal):
    _, app = owner_portal
    client, other = app.test_client(), app.test_client()
    sign_in(client, OWNER)
    sign_in(other, OWNER)

    wrong = change(client, "not my password", NEW_PASSWORD)
    assert wrong.status_code == 400 and "current password is not right" in wrong.get_data(
        as_text=True)
    assert kinds("sign_in_failed") == 1
    weak = change(client, PASSWORD, "short")
    assert weak.status_code == 400 and "at least 12" in weak.get_data(as_text=True)
    assert verify_password(Account.get().password_hash, PASSWORD)
    assert is_signed_in(other)

    done = change(client, PASSWORD, NEW_PASSWORD)
    assert done.status_code == 302
    assert "Your password was changed" in client.get(done.location).get_data(as_text=True)
    assert is_signed_in(client) and not is_signed_in(other)
    assert verify_password(Account.get().password_hash, NEW_PASSWORD)
    assert kinds("password_changed") == 1
    assert WebSession.select().where(WebSession.ended_at.is_null()
                                     & WebSession.account.is_null(False)).count() == 1


def test_guessing_the_current_password_is_throttled(owner_portal):
    _, app = owner_portal
    client = app.test_client()
    sign_in(client, OWNER)
    for n in range(auth.PER_PAIR):
        assert change(client, f"guess number {n}", NEW_PASSWORD).status_code == 400
    assert change(client, PASSWORD, NEW_PASSWORD).status_code == 429
    assert verify_password(Account.get().password_hash, PASSWORD)
