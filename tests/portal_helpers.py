"""Builders for portal tests: a share with real encrypted documents and known link tokens,
accounts, and a Flask test client with the CSRF token at hand."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import secrets
import time

from mailbridge.clock import ManualClock
from mailbridge.store import sealed, tokens
from mailbridge.store.blobs import put_bytes
from mailbridge.store.models import Account, Document, Grant, Share, WebSession
from mailbridge.web import create_app, sessions
from mailbridge.web.passwords import hash_password
from tests.helpers import add_jane, pdf_bytes

PASSWORD = "correct horse battery"
OWNER = "dr.smith@ortho.example"
START = dt.datetime(2026, 11, 28, 12, 0)


def portal_runtime(runtime, start: dt.datetime = START):
    """The test runtime with a clock the test moves."""
    return dataclasses.replace(runtime, clock=ManualClock(start))


def make_app(runtime):
    app = create_app(runtime.settings, runtime=runtime)
    app.config["TESTING"] = True
    return app


def make_share(runtime, recipients=("dr.smith@ortho.example",), documents=None,
               title="POC for R.T.", note_html="<p>Please review.</p>", hours: float = 24):
    """Returns (share, {address: token}). Documents are stored encrypted like real ones."""
    member = add_jane() if not Share.select().exists() else Share.select().first().sender
    now = runtime.clock()
    documents = documents if documents is not None else [
        ("plan-of-care.pdf", "pdf", "application/pdf", pdf_bytes("plan", size=3000))]
    share = Share.create(clinic=member.clinic, sender=member, created_at=now,
                         dedupe_key=tokens.new_link_token(),
                         reply_key_hash=tokens.new_link_token())
    sealed.seal_share(runtime.phi_key, share, title, note_html)
    for position, (name, kind, content_type, data) in enumerate(documents):
        blob = put_bytes(runtime.documents, data)
        document = Document.create(share=share, position=position, kind=kind,
                                   content_type=content_type, size=blob.size, sha256=blob.sha256,
                                   blob_id=blob.blob_id, blob_key=blob.wrapped_key)
        sealed.seal_document_name(runtime.phi_key, document, name)
    links = {}
    for address in recipients:
        token = tokens.new_link_token()
        Grant.create(share=share, address=address, token_hash=tokens.hash_token(token),
                     deadline=now + dt.timedelta(hours=hours), created_at=now)
        links[address] = token
    return share, links


def make_account(runtime, address: str, password: str = PASSWORD) -> Account:
    now = runtime.clock()
    return Account.create(email=address, password_hash=hash_password(password), created_at=now,
                          verified_at=now)


def form_token(page: str) -> str:
    """The CSRF token of the (first) form in a rendered page."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "no form with a CSRF token on the page"
    return match.group(1)


def without_csrf(page) -> bytes:
    """A response's body with its CSRF token removed: the token is signed with a timestamp,
    so two renders of the same page a second apart differ there and only there."""
    return re.sub(rb'name="csrf_token" value="[^"]+"', b"", page.get_data())


def csrf(client, path: str) -> str:
    """The CSRF token from the form on `path` (as a browser would have it)."""
    return form_token(client.get(path).get_data(as_text=True))


def sign_in(client, address: str, password: str = PASSWORD):
    token = csrf(client, "/signin")
    return client.post("/signin", data={"csrf_token": token, "email": address,
                                        "password": password})


def open_session(runtime, account) -> str:
    """A session for `account` as signing in leaves it; returns the cookie's value."""
    sid = secrets.token_urlsafe(32)
    now = runtime.clock()
    WebSession.create(id_hash=tokens.hash_token(sid), account=account, data={},
                      created_at=now, last_seen_at=now)
    return sid


def signed_in_client(app, runtime, account):
    """A browser with an open session for `account` (as after signing in)."""
    client = app.test_client()
    client.set_cookie("mb_session", open_session(runtime, account))
    return client


def claim(runtime, share, address, account):
    (Grant.update(state="claimed", account=account, claimed_at=runtime.clock())
     .where((Grant.share == share) & (Grant.address == address)).execute())
    return Grant.get((Grant.share == share) & (Grant.address == address))


def send_back_form(csrf_token: str, filename: str, data: bytes) -> tuple[bytes, str]:
    """The "send documents back" form as a browser encodes it: (body, Content-Type)."""
    boundary = "mailbridge-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"csrf_token\"\r\n\r\n"
            f"{csrf_token}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"{filename}\"\r\nContent-Type: application/pdf\r\n\r\n").encode()
    return (body + data + f"\r\n--{boundary}--\r\n".encode(),
            f"multipart/form-data; boundary={boundary}")


def claimed_share(runtime, documents=None):
    """A share claimed by OWNER's account, and a portal session cookie for that account."""
    share, _ = make_share(runtime, documents=documents)
    owner = make_account(runtime, OWNER)
    claim(runtime, share, OWNER, owner)
    return share, open_session(runtime, owner)


def portal_request(conn, method: str, path: str, sid: str, body: bytes = b"",
                   content_type: str = "", host: str = "127.0.0.1") -> tuple[int, bytes]:
    """One request signed in with `sid` on an http.client connection (plain or TLS), which
    it closes: (status, body of the answer)."""
    headers = {"Host": host, "Cookie": f"{sessions.COOKIE}={sid}"}
    if body:
        headers["Content-Type"] = content_type
    try:
        conn.request(method, path, body=body or None, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def download_slowly(conn, document_id: int, sid: str, host: str = "127.0.0.1") -> bytes:
    """GET a document's download on `conn` and read the answer like a slow client: nothing
    for 1.5 s (the server runs ahead of its reader), then in small sips. The whole answer."""
    conn.sendall(f"GET /documents/{document_id}/download HTTP/1.1\r\nHost: {host}\r\n"
                 f"Cookie: {sessions.COOKIE}={sid}\r\nConnection: close\r\n\r\n".encode())
    time.sleep(1.5)
    received = bytearray()
    while chunk := conn.recv(256 * 1024):
        received += chunk
        time.sleep(0.005)
    return bytes(received)
