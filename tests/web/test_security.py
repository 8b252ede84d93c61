"""Portal-wide protections: CSRF on every POST, session cookies and their timeouts, no session
fixation, security headers, and pages with no script and nothing from other hosts."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re

import pytest
from flask import url_for

from mailbridge.store import tokens
from mailbridge.store.models import (
    Account,
    AuditEvent,
    Grant,
    OutboundMessage,
    PasswordReset,
    WebSession,
)
from mailbridge.web import auth, sessions
from tests.conftest import ROOT
from tests.portal_helpers import (
    OWNER,
    PASSWORD,
    csrf,
    form_token,
    make_app,
    make_share,
    portal_runtime,
    sign_in,
)
from tests.web.test_accounts import is_signed_in

NEWCOMER = "new.person@elsewhere.example"




def with_settings(rt, **sections):
    """The runtime with some settings sections changed, e.g. web={"session_idle_minutes": 5}."""
    settings = rt.settings
    for name, values in sections.items():
        settings = dataclasses.replace(settings, **{
            name: dataclasses.replace(getattr(settings, name), **values)})
    return dataclasses.replace(rt, settings=settings)


def set_cookie_header(response, name: str) -> str:
    return next(h for h in response.headers.getlist("Set-Cookie") if h.startswith(f"{name}="))


# --- CSRF ------------------------------------------------------------------------------------


@pytest.fixture
def world(owner_portal):
    """A signed-in owner with a claimed share, a newcomer's pending link and a reset link."""
    rt, app = owner_portal
    account = Account.get()
    share, links = make_share(rt, recipients=(OWNER, NEWCOMER))
    Grant.update(state="claimed", account=account, claimed_at=rt.clock()).where(
        Grant.address == OWNER).execute()
    reset_token = tokens.new_link_token()
    PasswordReset.create(account=account, token_hash=tokens.hash_token(reset_token),
                         created_at=rt.clock(), expires_at=rt.clock() + dt.timedelta(minutes=30))
    client = app.test_client()
    sign_in(client, OWNER)
    csrf(client, "/account/password")  # the session holds its own token from now on
    posts = {
        "accounts.signin": ("/signin", {"email": OWNER, "password": PASSWORD}),
        "accounts.signout": ("/signout", {}),
        "accounts.forgot": ("/forgot", {"email": OWNER}),
        "accounts.reset": (f"/reset/{reset_token}", {"new_password": "maple lantern orbit"}),
        "accounts.change_password": ("/account/password", {"password": PASSWORD,
                                                           "new_password": "maple lantern orbit"}),
        "links.claim": (f"/s/{links[NEWCOMER]}/claim", {}),
        "library.archive": (f"/library/shares/{share.id}/archive", {}),
    }
    return app, client, {k: v for k, v in posts.items() if k in app.view_functions}


def state() -> tuple:
    """Everything a forged POST could change."""
    return (AuditEvent.select().count(), [a.password_hash for a in Account.select()],
            [r.used_at for r in PasswordReset.select()],
            [(g.state, g.account_id, g.archived_at) for g in Grant.select().order_by(Grant.id)],
            OutboundMessage.select().count(),
            WebSession.select().where(WebSession.ended_at.is_null()
                                      & WebSession.account.is_null(False)).count())


def test_post_without_the_right_csrf_token_is_refused_and_changes_nothing(world):
    app, client, posts = world
    stranger = app.test_client()
    foreign_token = csrf(stranger, "/signin")  # valid, but for another browser's session
    before = state()
    for endpoint, (path, data) in posts.items():
        for token in (None, "", "not-a-token", foreign_token):
            form = dict(data) if token is None else {**data, "csrf_token": token}
            response = client.post(path, data=form)
            assert response.status_code == 400, (endpoint, token)
            assert "This form has expired" in response.get_data(as_text=True)
    assert state() == before
    assert is_signed_in(client)


def test_every_post_route_wants_a_csrf_token(world):
    app, client, _ = world
    rules = [r for r in app.url_map.iter_rules() if "POST" in r.methods]
    assert {"accounts.signin", "accounts.signout", "accounts.forgot", "accounts.reset",
            "accounts.change_password"} <= {r.endpoint for r in rules}
    with app.test_request_context():
        paths = {r.endpoint: url_for(r.endpoint, **dict.fromkeys(r.arguments, 1)) for r in rules}
    # The link page's own two buttons post to an address holding the link's secret token
    # (link_actions.py): without it they find nothing, whatever the form carries.
    bearer = {"link_actions.proceed", "link_actions.ask_again"}
    for endpoint, path in paths.items():
        expected = 404 if endpoint in bearer else 400
        assert client.post(path, data={"csrf_token": "forged"}).status_code == expected, endpoint


# --- session cookies -------------------------------------------------------------------------


def test_cookies_are_httponly_and_samesite(owner_portal):
    _, app = owner_portal
    response = sign_in(app.test_client(), OWNER)
    session_cookie = set_cookie_header(response, sessions.COOKIE)
    for attribute in ("HttpOnly", "SameSite=Lax", "Path=/"):
        assert attribute in session_cookie
    assert "Secure" not in session_cookie and "Expires" not in session_cookie
    device = set_cookie_header(response, auth.DEVICE_COOKIE)
    assert "HttpOnly" in device and "SameSite=Lax" in device
    assert f"Max-Age={180 * 24 * 3600}" in device


def test_cookies_are_secure_behind_https(owner_portal):
    rt, _ = owner_portal
    app = make_app(with_settings(rt, service={"base_url": "https://portal.example"}))
    client = app.test_client()
    base = "https://portal.example"
    page = client.get("/signin", base_url=base)
    assert "Secure" in set_cookie_header(page, sessions.ANON_COOKIE)
    token = form_token(page.get_data(as_text=True))
    response = client.post("/signin", base_url=base, headers={"Referer": f"{base}/signin"},
                           data={"csrf_token": token, "email": OWNER, "password": PASSWORD})
    assert response.status_code == 302
    assert "Secure" in set_cookie_header(response, sessions.COOKIE)
    assert "Secure" in set_cookie_header(response, auth.DEVICE_COOKIE)


def test_signing_in_replaces_the_session(owner_portal):
    _, app = owner_portal
    client = app.test_client()
    csrf(client, "/signin")
    before = client.get_cookie(sessions.ANON_COOKIE).value
    assert client.get_cookie(sessions.COOKIE) is None
    sign_in(client, OWNER)
    assert is_signed_in(client) and client.get_cookie(sessions.ANON_COOKIE) is None

    planted = app.test_client()  # a browser that knows the cookie from before sign-in
    planted.set_cookie(sessions.ANON_COOKIE, before)
    assert not is_signed_in(planted)


def test_signing_in_from_a_planted_server_session_id_gets_a_new_one(owner_portal):
    _, app = owner_portal
    client = app.test_client()
    sign_in(client, OWNER)
    earlier = client.get_cookie(sessions.COOKIE).value
    client.post("/signout", data={"csrf_token": csrf(client, "/account/password")})
    client.set_cookie(sessions.COOKIE, earlier)  # planted: an id an attacker knows
    sign_in(client, OWNER)
    assert client.get_cookie(sessions.COOKIE).value != earlier and is_signed_in(client)
    assert WebSession.get(WebSession.id_hash == tokens.hash_token(earlier)).ended_at is not None


def test_signing_out_ends_the_session_on_the_server(owner_portal):
    _, app = owner_portal
    client = app.test_client()
    sign_in(client, OWNER)
    stolen = client.get_cookie(sessions.COOKIE).value
    client.post("/signout", data={"csrf_token": csrf(client, "/account/password")})

    replay = app.test_client()
    replay.set_cookie(sessions.COOKIE, stolen)
    assert not is_signed_in(replay)
    assert WebSession.get(WebSession.id_hash == tokens.hash_token(stolen)).ended_at is not None


def test_idle_timeout(owner_portal):
    rt, app = owner_portal
    client, idle = app.test_client(), app.test_client()
    sign_in(client, OWNER)
    sign_in(idle, OWNER)
    rt.clock.advance(minutes=14)
    assert is_signed_in(client)
    rt.clock.advance(minutes=16)
    assert not is_signed_in(client)
    assert not is_signed_in(idle)


def test_idle_timeout_follows_the_setting(owner_portal):
    rt, _ = owner_portal
    short = with_settings(rt, web={"session_idle_minutes": 5})
    client = make_app(short).test_client()
    sign_in(client, OWNER)
    rt.clock.advance(minutes=4)
    assert is_signed_in(client)
    rt.clock.advance(minutes=6)
    assert not is_signed_in(client)


def test_absolute_timeout_even_when_active(owner_portal):
    rt, app = owner_portal
    client = app.test_client()
    sign_in(client, OWNER)
    start = rt.clock()
    while rt.clock() - start < dt.timedelta(hours=12):
        rt.clock.advance(minutes=10)
        assert is_signed_in(client), rt.clock() - start
    rt.clock.advance(minutes=10)
    assert not is_signed_in(client)


# --- headers and page content ----------------------------------------------------------------


def pages(rt, app) -> dict:
    """Every page we can reach, anonymous and signed in: {path: response}."""
    share, links = make_share(rt, recipients=(OWNER,))
    reset_token = tokens.new_link_token()
    PasswordReset.create(account=Account.get(), token_hash=tokens.hash_token(reset_token),
                         created_at=rt.clock(), expires_at=rt.clock() + dt.timedelta(minutes=30))
    anonymous, member = app.test_client(), app.test_client()
    found = {path: anonymous.get(path) for path in (
        "/signin", "/forgot", f"/reset/{reset_token}", "/reset/unknown", "/nothing-here",
        f"/s/{links[OWNER]}", f"/s/{links[OWNER]}/next")}
    found["POST /signin"] = anonymous.post("/signin", data={
        "csrf_token": csrf(anonymous, "/signin"), "email": OWNER, "password": "wrong guess"})
    found["POST /forgot"] = anonymous.post("/forgot", data={
        "csrf_token": csrf(anonymous, "/forgot"), "email": OWNER})
    found["forged POST"] = anonymous.post("/forgot", data={"email": OWNER})
    sign_in(member, OWNER)
    Grant.update(state="claimed", account=Account.get()).execute()
    document = share.documents.get()
    for path in ("/account/password", "/library", "/library/archived",
                 f"/documents/{document.id}"):
        found[path] = member.get(path)
    return found


def csp(header: str) -> dict[str, list[str]]:
    policy = {}
    for directive in filter(str.strip, header.split(";")):
        name, *values = directive.split()
        policy[name] = values
    return policy


def test_security_headers_on_every_page(owner_portal):
    rt, app = owner_portal
    for path, response in pages(rt, app).items():
        headers = response.headers
        policy = csp(headers["Content-Security-Policy"])
        scripts = policy.get("script-src", policy["default-src"])
        assert "'unsafe-inline'" not in scripts, path
        assert policy["frame-ancestors"] == ["'none'"], path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["Referrer-Policy"] == "no-referrer", path
        assert headers["Cache-Control"] == "no-store", path
        assert headers["X-Frame-Options"] == "DENY", path


def test_hsts_only_when_the_portal_is_https(owner_portal):
    rt, app = owner_portal
    plain = app.test_client()
    for path in ("/signin", "/healthz", "/nothing-here"):
        assert "Strict-Transport-Security" not in plain.get(path).headers, path
    https = make_app(with_settings(rt, service={"base_url": "https://portal.example"}))
    client = https.test_client()
    for path in ("/signin", "/healthz", "/nothing-here"):
        response = client.get(path, base_url="https://portal.example")
        assert response.headers["Strict-Transport-Security"] == \
            "max-age=31536000; includeSubDomains", path


def test_no_script_in_any_page(owner_portal):
    rt, app = owner_portal
    for path, response in pages(rt, app).items():
        if response.mimetype == "text/html":
            assert "<script" not in response.get_data(as_text=True).lower(), path


def test_templates_load_nothing_from_other_hosts():
    pages = list((ROOT / "templates" / "portal").rglob("*.html"))
    styles = list((ROOT / "mailbridge" / "web" / "static").rglob("*.css"))
    assert pages and styles
    files = pages + styles
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"https?://", text, re.I), path.name
        assert not re.search(r"""(?:href|src|action)\s*=\s*["']?//""", text, re.I), path.name
        assert not re.search(r"url\(\s*['\"]?//", text, re.I), path.name


def test_wsgi_entry_point_builds_the_portal_from_the_config_file(tmp_path, monkeypatch):
    """What gunicorn imports when the portal is scaled out."""
    import base64
    import importlib
    import os
    import sys

    config = tmp_path / "config.toml"
    config.write_text(
        '[service]\nbase_url = "https://portal.example"\ndata_dir = "data"\n'
        '[addresses]\nsharing = "share@portal.example"\nreply_domain = "reply.portal.example"\n'
        '[outbound]\nfrom = "mailbridge@portal.example"\n')
    monkeypatch.setenv("MAILBRIDGE_CONFIG", str(config))
    monkeypatch.setenv("MAILBRIDGE_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    sys.modules.pop("mailbridge.web.wsgi", None)
    wsgi = importlib.import_module("mailbridge.web.wsgi")
    response = wsgi.app.test_client().get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}
    sys.modules.pop("mailbridge.web.wsgi", None)


def test_every_visible_form_field_has_a_label(runtime):
    """Screen readers announce each field: every input that is not hidden has a <label for>."""
    import re

    from tests.portal_helpers import make_app, make_share

    rt = portal_runtime(runtime)
    _, links = make_share(rt)
    client = make_app(rt).test_client()
    token = next(iter(links.values()))
    pages = ["/signin", "/forgot", f"/s/{token}/next"]
    client.post(f"/s/{token}/code", data={"csrf_token": csrf(client, f"/s/{token}/next")})
    pages.append(f"/s/{token}/next")  # now the code-entry form
    checked = 0
    for path in pages:
        html = client.get(path).get_data(as_text=True)
        labels = set(re.findall(r'<label[^>]*\bfor="([^"]+)"', html))
        for tag in re.findall(r"<input\b[^>]*>", html):
            if 'type="hidden"' in tag:
                continue
            field_id = re.search(r'\bid="([^"]+)"', tag)
            assert field_id and field_id.group(1) in labels, f"{path}: unlabeled {tag}"
            checked += 1
    assert checked >= 3
