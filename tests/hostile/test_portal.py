"""Attacks on the recipient portal: other people's documents (IDOR), sessions planted or
forged, a forwarded link used by someone else, forms without their CSRF token, codes and
tokens guessed, redirects off the site. Each gets nothing and changes nothing."""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time

import pytest

from mailbridge.store import tokens
from mailbridge.store.models import Account, AuditEvent, Grant, OneTimeCode, WebSession
from mailbridge.web import sessions
from tests.portal_helpers import (
    OWNER,
    PASSWORD,
    claim,
    csrf,
    make_account,
    make_app,
    make_share,
    open_session,
    portal_runtime,
    sign_in,
    signed_in_client,
    without_csrf,
)

OTHER = "counsel@law.example"


@pytest.fixture
def portal(runtime):
    rt = portal_runtime(runtime)
    share, links = make_share(rt, recipients=(OWNER, OTHER))
    owner = make_account(rt, OWNER)
    claim(rt, share, OWNER, owner)
    return rt, make_app(rt), share, links


def grants() -> list[tuple]:
    return [(g.id, g.state, g.account_id, g.token_hash) for g in Grant.select().order_by(Grant.id)]


def test_idor_another_accounts_document_looks_exactly_like_a_missing_one(portal):
    rt, app, share, _ = portal
    intruder = signed_in_client(app, rt, make_account(rt, "eve@evil.example"))
    document = share.documents.get()
    paths = [f"/documents/{document.id}", f"/documents/{document.id}/inline",
             f"/documents/{document.id}/download"]
    mine = [intruder.get(p) for p in paths]
    missing = [intruder.get(p.replace(str(document.id), "999999")) for p in paths]
    assert [r.status_code for r in mine] == [404, 404, 404]
    assert [without_csrf(r) for r in mine] == [without_csrf(r) for r in missing]
    assert b"%PDF" not in b"".join(r.get_data() for r in mine)
    assert AuditEvent.select().where(AuditEvent.kind == "access_denied").count() == 6


def test_forwarded_link_used_while_signed_in_as_someone_else_claims_nothing(portal):
    rt, app, share, links = portal
    before = grants()
    intruder = signed_in_client(app, rt, make_account(rt, "eve@evil.example"))
    page = intruder.get(f"/s/{links[OTHER]}/next")
    assert page.status_code == 403
    token = csrf(intruder, "/account/password")
    assert intruder.post(f"/s/{links[OTHER]}/claim",
                         data={"csrf_token": token}).status_code == 403
    assert grants() == before
    assert AuditEvent.get(AuditEvent.kind == "access_denied").detail == {
        "reason": "wrong_account"}


def test_planted_anonymous_cookie_never_carries_the_victims_proven_mailbox(portal):
    rt, app, share, links = portal
    attacker, victim = app.test_client(), app.test_client()
    attacker.get(f"/s/{links[OTHER]}/next")
    planted = attacker.get_cookie(sessions.ANON_COOKIE).value
    victim.set_cookie(sessions.ANON_COOKIE, planted)
    victim.post(f"/s/{links[OTHER]}/code",
                data={"csrf_token": csrf(victim, f"/s/{links[OTHER]}/next")})
    from tests.web.test_links import latest_code

    victim.post(f"/s/{links[OTHER]}/verify",
                data={"csrf_token": csrf(victim, f"/s/{links[OTHER]}/next"),
                      "code": latest_code(rt)})
    attacker.set_cookie(sessions.ANON_COOKIE, planted)
    page = attacker.get(f"/s/{links[OTHER]}/next").get_data(as_text=True)
    assert 'name="password"' not in page
    attacker.post(f"/s/{links[OTHER]}/register",
                  data={"csrf_token": csrf(attacker, f"/s/{links[OTHER]}/next"),
                        "password": "a brand new passphrase"})
    assert not Account.select().where(Account.email == OTHER).exists()


def test_planted_server_session_id_is_replaced_at_sign_in(portal):
    rt, app, _, _ = portal
    client = app.test_client()
    known = "attacker-chosen-" + "x" * 40
    client.set_cookie(sessions.COOKIE, known)
    sign_in(client, OWNER)
    assert client.get_cookie(sessions.COOKIE).value != known
    assert not WebSession.select().where(WebSession.id_hash == tokens.hash_token(known)).exists()


def test_forged_anonymous_cookie_grants_nothing(portal):
    rt, app, _, links = portal
    client = app.test_client()
    client.set_cookie(sessions.ANON_COOKIE, "A" * 200)
    page = client.get(f"/s/{links[OTHER]}/next").get_data(as_text=True)
    assert "Send me a code" in page and 'name="password"' not in page


@pytest.mark.parametrize("path, data", [
    ("/s/{token}/code", {}),
    ("/s/{token}/verify", {"code": "123456"}),
    ("/s/{token}/register", {"password": "a brand new passphrase"}),
    ("/signin", {"email": OWNER, "password": PASSWORD}),
])
def test_cross_site_form_without_its_csrf_token_is_refused(portal, path, data):
    rt, app, _, links = portal
    before = grants()
    response = app.test_client().post(path.format(token=links[OTHER]), data=data)
    assert response.status_code == 400
    assert grants() == before and not OneTimeCode.select().exists()
    assert not AuditEvent.select().where(AuditEvent.kind == "signed_in").exists()


def test_guessing_the_code_stops_after_five_tries(portal):
    rt, app, _, links = portal
    client = app.test_client()
    page = f"/s/{links[OTHER]}/next"
    client.post(f"/s/{links[OTHER]}/code", data={"csrf_token": csrf(client, page)})
    from tests.web.test_links import latest_code

    real = latest_code(rt)
    wrong = [f"{(int(real) + n) % 10**6:06d}" for n in range(1, 6)]
    for guess in wrong:
        client.post(f"/s/{links[OTHER]}/verify", data={"csrf_token": csrf(client, page),
                                                       "code": guess})
    answer = client.post(f"/s/{links[OTHER]}/verify",
                         data={"csrf_token": csrf(client, page), "code": real})
    assert answer.status_code == 400 and "no longer be used" in answer.get_data(as_text=True)
    assert 'name="password"' not in client.get(page).get_data(as_text=True)


def test_guessing_link_tokens_is_slowed_down(portal):
    _, app, _, _ = portal
    client = app.test_client()
    answers = [client.get(f"/s/{'G' * 40}{n:03d}").status_code for n in range(31)]
    assert set(answers[:30]) == {404} and answers[30] == 429


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x",
                                    "/\\evil.example", "/\t/evil.example",
                                    "javascript:alert(1)"])
def test_sign_in_never_redirects_off_the_site(portal, target):
    _, app, _, _ = portal
    client = app.test_client()
    token = csrf(client, "/signin")
    response = client.post("/signin", data={"csrf_token": token, "email": OWNER,
                                            "password": PASSWORD, "next": target})
    location = response.headers["Location"]
    assert response.status_code == 302 and re.match(r"^(/|http://localhost/)", location)
    assert "evil" not in location and "javascript" not in location


def test_revoked_recipient_is_refused_on_the_very_next_request(portal):
    rt, app, share, _ = portal
    client = app.test_client()
    sign_in(client, OWNER)
    document = share.documents.get()
    assert client.get(f"/documents/{document.id}/download").status_code == 200
    Grant.update(state="revoked").where(Grant.address == OWNER).execute()
    assert client.get(f"/documents/{document.id}/download").status_code == 404
    assert client.get(f"/documents/{document.id}").status_code == 404


def test_a_large_download_to_a_slow_reader_never_lands_on_disk_in_clear(service, monkeypatch):
    """An attacker with the disk (a stolen drive, a backup of /tmp, forensic recovery of freed
    blocks) must not find a document in clear. waitress copies what a response has written
    ahead of its client into a temporary file once that passes 1 MB: for a download, the
    decrypted document. A reader that takes its time makes the portal run ahead of it."""
    spilled = []
    real_temporary_file = tempfile.TemporaryFile

    def watched(*args, **kwargs):
        spilled.append(args)
        return real_temporary_file(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", watched)
    rt = service.runtime
    document = b"%PDF-1.4\n" + os.urandom(6 * 1024 * 1024)
    share, _links = make_share(rt, documents=[("plan.pdf", "pdf", "application/pdf", document)])
    owner = make_account(rt, OWNER)
    claim(rt, share, OWNER, owner)
    sid = open_session(rt, owner)
    document_id = share.documents[0].id
    with socket.create_connection(("127.0.0.1", service.service.web_port), timeout=30) as conn:
        conn.sendall(f"GET /documents/{document_id}/download HTTP/1.1\r\n"
                     f"Host: 127.0.0.1\r\nCookie: {sessions.COOKIE}={sid}\r\n"
                     "Connection: close\r\n\r\n".encode())
        time.sleep(1.5)  # the portal decrypts and writes while nobody reads
        received = bytearray()
        while chunk := conn.recv(256 * 1024):
            received += chunk
            time.sleep(0.005)
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == document
    assert spilled == []
