"""Attacks on the recipient portal: other people's documents (IDOR), sessions planted or
forged, a forwarded link used by someone else, forms without their CSRF token, codes and
tokens guessed, redirects off the site. Each gets nothing and changes nothing."""

from __future__ import annotations

import http.client
import os
import re
import socket
import subprocess
import tempfile

import pytest

from mailbridge.store import tokens
from mailbridge.store.models import (
    Account,
    AuditEvent,
    Grant,
    OneTimeCode,
    SentBack,
    WebSession,
)
from mailbridge.web import sessions
from tests.conftest import start_service
from tests.helpers import pdf_bytes
from tests.portal_helpers import (
    OWNER,
    PASSWORD,
    claim,
    claimed_share,
    csrf,
    download_slowly,
    form_token,
    make_account,
    make_app,
    make_share,
    portal_request,
    portal_runtime,
    send_back_form,
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


def _temporary_files(monkeypatch) -> list[str]:
    """The directory of every temporary file the process opens from now on (waitress names
    none: Python's temporary directory decides)."""
    made: list[str] = []
    real_temporary_file = tempfile.TemporaryFile

    def watched(*args, **kwargs):
        made.append(kwargs.get("dir") or tempfile.gettempdir())
        return real_temporary_file(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", watched)
    return made


def _filesystem(path: str) -> str:
    # Told by coreutils, not by the code under test.
    return subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_large_download_to_a_slow_reader_never_lands_on_disk_in_clear(service, monkeypatch):
    """An attacker with the disk (a stolen drive, a backup of /tmp, forensic recovery of freed
    blocks) must not find a document in clear. waitress copies what a response has written
    ahead of its client into a temporary file once that passes 1 MB: for a download, the
    decrypted document. A reader that takes its time makes the portal run ahead of it."""
    spilled = _temporary_files(monkeypatch)
    rt = service.runtime
    document = b"%PDF-1.4\n" + os.urandom(6 * 1024 * 1024)
    share, sid = claimed_share(rt, documents=[("plan.pdf", "pdf", "application/pdf", document)])
    with socket.create_connection(("127.0.0.1", service.service.web_port), timeout=30) as conn:
        # The portal decrypts and writes while nobody reads.
        received = download_slowly(conn, share.documents[0].id, sid)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == document
    assert spilled == []


def test_a_document_sent_back_never_lands_on_disk_in_clear(service, monkeypatch):
    """The same attacker, the other way: waitress holds a request body over 512 KB in a
    temporary file until it is complete, which for a recipient sending documents back is the
    documents in clear. Such a file may only be on a memory file system."""
    made = _temporary_files(monkeypatch)
    rt = service.runtime
    share, sid = claimed_share(rt)
    signed = pdf_bytes("signed plan of care", size=3 * 1024 * 1024)
    port = service.service.web_port
    path = f"/library/shares/{share.id}/send-back"
    _, page = portal_request(_connection(port), "GET", path, sid)
    body, content_type = send_back_form(form_token(page.decode()), "signed.pdf", signed)
    status, _ = portal_request(_connection(port), "POST", path, sid, body, content_type)
    assert status == 302  # taken: the library says it was sent back
    assert SentBack.select().count() == 1
    assert made, "waitress kept the 3 MB body in memory: nothing left to check"
    assert {_filesystem(directory) for directory in made} <= {"tmpfs", "ramfs"}, made


def test_a_body_larger_than_any_upload_is_refused_before_it_is_read(tmp_path, db_url, sink,
                                                                    keyring):
    """Without a cap of its own, waitress would read up to 1 GB per connection into a
    temporary file before the portal could say no."""
    running = start_service(tmp_path, db_url, sink, keyring,
                            MAILBRIDGE_SMTP_MAX_MESSAGE_BYTES=str(1024 * 1024))
    try:
        with socket.create_connection(("127.0.0.1", running.service.web_port),
                                      timeout=10) as conn:
            conn.sendall(_upload_head(200 * 1024 * 1024))
            conn.sendall(b"x" * 65536)  # and then nothing more: the answer comes now
            assert conn.recv(4096).startswith(b"HTTP/1.1 413")
    finally:
        running.service.stop(timeout=10)


@pytest.fixture
def small_memory_fs(tmp_path):
    """A 1 MB tmpfs of its own (needs the right to mount, as root in CI)."""
    where = tmp_path / "small-tmpfs"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield where
    subprocess.run(["umount", str(where)], check=False)


def test_bodies_beyond_the_memory_file_system_fail_alone(tmp_path, db_url, sink, keyring,
                                                        small_memory_fs):
    """Many large bodies at once fill the memory file system they wait in: the request that
    does not fit is cut off, and the portal answers the next one as before."""
    running = start_service(tmp_path, db_url, sink, keyring,
                            MAILBRIDGE_WEB_BODY_BUFFER_DIR=str(small_memory_fs))
    try:
        port = running.service.web_port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(_upload_head(3 * 1024 * 1024))
            try:
                conn.sendall(b"x" * (3 * 1024 * 1024))
                answer = conn.recv(4096)
            except OSError:  # reset once the 1 MB file system is full
                answer = b""
            assert answer == b""  # cut off: no page, not even an error page
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        running.service.stop(timeout=10)
    assert os.listdir(small_memory_fs) == []  # its private directory is gone with it


def _upload_head(length: int) -> bytes:
    """The head of an upload announcing `length` bytes of body, before any session check."""
    return (b"POST /library/shares/1/send-back HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: %d\r\n\r\n" % length)


def _connection(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=30)
