"""Viewing and downloading: the right bytes, streamed, with safe headers, only for the account
that claimed the share, and every refusal looking like "not found"."""

from __future__ import annotations

import os
import secrets
import threading

import pytest
from werkzeug.http import parse_options_header
from werkzeug.serving import make_server

from mailbridge.store import tokens
from mailbridge.store.models import AuditEvent, Document, Grant, WebSession
from tests.helpers import one_page_pdf, pdf_bytes
from tests.portal_helpers import (
    claim,
    make_account,
    make_app,
    make_share,
    portal_runtime,
    signed_in_client,
    without_csrf,
)

SMITH = "dr.smith@ortho.example"
JONES = "dr.jones@ortho.example"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
PDF = pdf_bytes("plan", size=3000)
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(700)


@pytest.fixture
def portal(runtime):
    """Smith has claimed a share of a PDF, a DOCX and a PNG and is signed in."""
    rt = portal_runtime(runtime)
    smith = make_account(rt, SMITH)
    share, _ = make_share(rt, documents=[
        ("Röntgen Müller.pdf", "pdf", "application/pdf", PDF),
        ("letter.docx", "docx", DOCX, b"PK\x03\x04 a letter"),
        ("x-ray.png", "png", "image/png", PNG)])
    grant = claim(rt, share, SMITH, smith)
    app = make_app(rt)
    pdf, docx, png = share.documents.order_by(Document.position)
    return rt, app, signed_in_client(app, rt, smith), grant, (pdf, docx, png)


def test_pdf_viewer_frames_the_inline_document(portal):
    _, _, client, _, (pdf, _, _) = portal
    page = client.get(f"/documents/{pdf.id}").get_data(as_text=True)
    assert "<title>Röntgen Müller.pdf" in page
    assert (f'<iframe class="viewer" src="/documents/{pdf.id}/inline"'
            f'\n            title="Röntgen Müller.pdf">') in page
    assert f'href="/documents/{pdf.id}/download"' in page and 'href="/library"' in page
    assert "print" in page


def test_docx_viewer_offers_a_download_instead(portal):
    _, _, client, _, (_, docx, _) = portal
    page = client.get(f"/documents/{docx.id}").get_data(as_text=True)
    assert "<iframe" not in page and "<img" not in page
    assert f'href="/documents/{docx.id}/download"\n          class="button">' in page
    assert client.get(f"/documents/{docx.id}/inline").status_code == 404


def test_image_viewer_shows_the_image(portal):
    _, _, client, _, (_, _, png) = portal
    page = client.get(f"/documents/{png.id}").get_data(as_text=True)
    assert f'<img class="viewer-image" src="/documents/{png.id}/inline"' in page
    inline = client.get(f"/documents/{png.id}/inline")
    assert inline.data == PNG and inline.headers["Content-Type"] == "image/png"


def test_inline_pdf_bytes_and_headers(portal):
    _, _, client, _, (pdf, _, _) = portal
    answer = client.get(f"/documents/{pdf.id}/inline")
    assert answer.status_code == 200 and answer.data == PDF
    headers = answer.headers
    assert headers["Content-Type"] == "application/pdf"
    assert headers["Content-Length"] == str(len(PDF))
    assert headers["Content-Disposition"].startswith("inline; ")
    assert parse_options_header(headers["Content-Disposition"])[1]["filename"] == (
        "Röntgen Müller.pdf")
    assert "frame-ancestors 'self'" in headers["Content-Security-Policy"]
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "SAMEORIGIN"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-store"
    # The viewer page itself still may not be framed by anyone.
    viewer = client.get(f"/documents/{pdf.id}").headers
    assert viewer["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in viewer["Content-Security-Policy"]


def test_download_is_an_attachment_with_rfc6266_names(portal):
    _, _, client, _, (pdf, docx, _) = portal
    answer = client.get(f"/documents/{pdf.id}/download")
    assert answer.data == PDF and answer.headers["Content-Length"] == str(len(PDF))
    assert answer.headers["Content-Disposition"] == (
        "attachment; filename=\"Rontgen Muller.pdf\"; "
        "filename*=UTF-8''R%C3%B6ntgen%20M%C3%BCller.pdf")
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.headers["Cache-Control"] == "no-store"
    docx_answer = client.get(f"/documents/{docx.id}/download")
    assert docx_answer.data == b"PK\x03\x04 a letter"
    assert docx_answer.headers["Content-Type"] == DOCX


def test_names_with_quotes_and_semicolons_cannot_break_the_header(portal):
    rt, app, _, _, _ = portal
    smith = make_account(rt, "other@ortho.example")
    name = 'a "quoted"; filename=evil.html\\ 100%.pdf'
    share, _ = make_share(rt, recipients=("other@ortho.example",),
                          documents=[(name, "pdf", "application/pdf", PDF)])
    claim(rt, share, "other@ortho.example", smith)
    document = share.documents.get()
    answer = signed_in_client(app, rt, smith).get(f"/documents/{document.id}/download")
    disposition, params = parse_options_header(answer.headers["Content-Disposition"])
    assert disposition == "attachment" and params["filename"] == name
    fallback = answer.headers["Content-Disposition"].split("; ")[1]
    assert fallback == 'filename="a _quoted__ filename=evil.html_ 100_.pdf"'


def test_a_stored_html_type_is_never_served_as_html(portal):
    rt, app, _, _, _ = portal
    account = make_account(rt, "other@ortho.example")
    share, _ = make_share(rt, recipients=("other@ortho.example",),
                          documents=[("page.txt", "txt", "text/html", b"<script>x</script>")])
    claim(rt, share, "other@ortho.example", account)
    document = share.documents.get()
    client = signed_in_client(app, rt, account)
    answer = client.get(f"/documents/{document.id}/download")
    assert answer.headers["Content-Type"] == "application/octet-stream"
    assert answer.headers["Content-Disposition"].startswith("attachment;")
    assert client.get(f"/documents/{document.id}/inline").status_code == 404


def test_another_accounts_document_looks_missing_and_is_audited(portal):
    rt, app, _, _, (pdf, _, _) = portal
    jones = make_account(rt, JONES)
    intruder = signed_in_client(app, rt, jones)
    for suffix in ("", "/inline", "/download"):
        theirs = intruder.get(f"/documents/{pdf.id}{suffix}")
        missing = intruder.get(f"/documents/999999{suffix}")
        assert theirs.status_code == missing.status_code == 404
        assert without_csrf(theirs) == without_csrf(missing)
        assert PDF not in theirs.get_data()
    denied = AuditEvent.select().where((AuditEvent.kind == "access_denied")
                                       & (AuditEvent.document == pdf.id))
    assert denied.count() == 3
    assert {(e.account_id, e.detail["reason"], e.detail["document_id"]) for e in denied} == {
        (jones.id, "not_yours", pdf.id)}
    assert not AuditEvent.select().where(AuditEvent.kind << ("document_viewed",
                                                            "document_downloaded")).exists()


def test_revocation_stops_the_next_request_of_an_open_session(portal):
    _, _, client, grant, (pdf, _, _) = portal
    assert client.get(f"/documents/{pdf.id}/inline").status_code == 200
    Grant.update(state="revoked").where(Grant.id == grant.id).execute()
    for suffix in ("", "/inline", "/download"):
        assert client.get(f"/documents/{pdf.id}{suffix}").status_code == 404
    library = client.get("/library")
    assert library.status_code == 200 and "Röntgen" not in library.get_data(as_text=True)
    reasons = {e.detail["reason"] for e in AuditEvent.select().where(
        AuditEvent.kind == "access_denied")}
    assert reasons == {"revoked"}


def test_an_unclaimed_expired_grant_opens_nothing(portal):
    rt, app, _, _, _ = portal
    account = make_account(rt, "late@ortho.example")
    share, _ = make_share(rt, recipients=("late@ortho.example",), hours=-1)
    document = share.documents.get()
    client = signed_in_client(app, rt, account)
    assert client.get(f"/documents/{document.id}/download").status_code == 404


def test_large_documents_are_streamed_in_chunks(portal):
    rt, app, _, _, _ = portal
    account = make_account(rt, "big@ortho.example")
    data = os.urandom(5 * 1024 * 1024 + 123)
    share, _ = make_share(rt, recipients=("big@ortho.example",),
                          documents=[("scan.pdf", "pdf", "application/pdf", data)])
    claim(rt, share, "big@ortho.example", account)
    document = share.documents.get()
    answer = signed_in_client(app, rt, account).get(f"/documents/{document.id}/download",
                                                    buffered=False)
    assert answer.is_streamed
    assert answer.headers["Content-Length"] == str(len(data))
    chunks = list(answer.response)
    assert len(chunks) > 1 and max(len(c) for c in chunks) < len(data)
    assert b"".join(chunks) == data
    answer.close()


def test_views_and_downloads_are_audited_with_who_and_where(portal):
    _, _, client, grant, (pdf, _, _) = portal
    headers = {"User-Agent": "Firefox/140"}
    client.get(f"/documents/{pdf.id}/inline", headers=headers,
               environ_base={"REMOTE_ADDR": "203.0.113.9"})
    client.get(f"/documents/{pdf.id}/download", headers=headers,
               environ_base={"REMOTE_ADDR": "203.0.113.9"})
    events = {e.kind: e for e in AuditEvent.select()}
    for kind in ("document_viewed", "document_downloaded"):
        event = events[kind]
        assert (event.account_id, event.document_id, event.grant_id, event.share_id) == (
            grant.account_id, pdf.id, grant.id, grant.share_id)
        assert event.ip == "203.0.113.9" and event.user_agent == "Firefox/140"


@pytest.mark.parametrize("suffix", ["", "/inline", "/download"])
def test_signed_out_visitors_are_sent_to_sign_in(portal, suffix):
    _, app, _, _, (pdf, _, _) = portal
    answer = app.test_client().get(f"/documents/{pdf.id}{suffix}")
    assert answer.status_code == 302
    assert answer.headers["Location"].startswith("/signin?next=")
    assert f"documents/{pdf.id}" in answer.headers["Location"]


# --- a real browser ---------------------------------------------------------------------------


def test_chromium_shows_the_pdf_inside_the_viewer_page(runtime, browser):
    rt = portal_runtime(runtime)
    account = make_account(rt, SMITH)
    share, _ = make_share(rt, documents=[("plan.pdf", "pdf", "application/pdf",
                                          one_page_pdf("Plan of care"))])
    claim(rt, share, SMITH, account)
    document = share.documents.get()
    sid = secrets.token_urlsafe(32)
    WebSession.create(id_hash=tokens.hash_token(sid), account=account, data={},
                      created_at=rt.clock(), last_seen_at=rt.clock())
    server = make_server("127.0.0.1", 0, make_app(rt), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        context = browser.new_context()
        context.add_cookies([{"name": "mb_session", "value": sid, "url": base}])
        page = context.new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        with page.expect_response(f"{base}/documents/{document.id}/inline") as inline:
            page.goto(f"{base}/documents/{document.id}")
        assert inline.value.status == 200
        page.wait_for_load_state("load")
        frames = [frame.url for frame in page.frames]
        # A framing refusal (frame-ancestors, X-Frame-Options) turns the frame into an error page.
        assert f"{base}/documents/{document.id}/inline" in frames
        assert not [url for url in frames if url.startswith("chrome-error:")]
        assert not [text for text in console if "Content Security Policy" in text]
        context.close()
    finally:
        server.shutdown()
