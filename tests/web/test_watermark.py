"""Watermarks: every PDF page and image a recipient views or downloads names them, the date and
the share; the stored original stays as it was; types that cannot carry a mark say so."""

from __future__ import annotations

import dataclasses
import io
import secrets
import threading

import pytest
from PIL import Image, ImageChops
from pypdf import PdfReader, PdfWriter
from werkzeug.serving import make_server

from mailbridge.settings import DocumentSettings
from mailbridge.shares import clinics
from mailbridge.store import tokens
from mailbridge.store.blobs import put_bytes
from mailbridge.store.models import AuditEvent, Document, WebSession
from mailbridge.web import watermark
from mailbridge.web.documents import STAMPING_AT_ONCE
from tests.conftest import ARTIFACTS
from tests.helpers import one_page_pdf
from tests.portal_helpers import (
    claim,
    form_token,
    make_account,
    make_app,
    make_share,
    portal_runtime,
    signed_in_client,
)

SMITH = "dr.smith@ortho.example"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
# The portal's clock starts at 12:00 UTC on 28 Nov 2026; the clinic is in New York.
EXPECTED_DATE = "28 Nov 2026"


def pdf_of_pages(*texts: str, rotate: tuple[int, ...] = ()) -> bytes:
    """A real PDF with one page of text per entry (optionally /Rotate'd pages)."""
    writer = PdfWriter()
    for number, text in enumerate(texts):
        writer.add_page(PdfReader(io.BytesIO(one_page_pdf(text))).pages[0])
        if number < len(rotate) and rotate[number]:
            writer.pages[-1].rotate(rotate[number])
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def image_bytes(image_format: str, size=(300, 200), frames: int = 1) -> bytes:
    pictures = [Image.new("RGB", size, (20 + 60 * n, 120, 200)) for n in range(frames)]
    out = io.BytesIO()
    pictures[0].save(out, image_format, save_all=frames > 1, append_images=pictures[1:])
    return out.getvalue()


PDF = pdf_of_pages("Plan of care", "Exercises", "Follow-up", rotate=(0, 90, 0))
PNG = image_bytes("PNG")
GIF = image_bytes("GIF", frames=3)


def with_watermark(rt, on: bool):
    return dataclasses.replace(rt, settings=dataclasses.replace(
        rt.settings, documents=DocumentSettings(watermark=on)))


def portal_for(runtime, *, configured: bool, clinic: str | None = None):
    """Smith has claimed a share of a PDF, a PNG, a GIF and a DOCX; `clinic` sets the
    clinic's own watermark ("on", "off", "configuration")."""
    rt = with_watermark(portal_runtime(runtime), configured)
    account = make_account(rt, SMITH)
    share, _ = make_share(rt, documents=[
        ("plan.pdf", "pdf", "application/pdf", PDF), ("knee.png", "png", "image/png", PNG),
        ("gait.gif", "gif", "image/gif", GIF), ("letter.docx", "docx", DOCX, b"PK\x03\x04 x")])
    if clinic is not None:
        clinics.change(share.clinic, clinics.Changes(watermark=clinic))
    grant = claim(rt, share, SMITH, account)
    app = make_app(rt)
    documents = list(share.documents.order_by(Document.position))
    return rt, app, signed_in_client(app, rt, account), grant, documents


def expected_line(share_id: int) -> str:
    return f"Shared with {SMITH} · {EXPECTED_DATE} · share {share_id}"


def test_a_downloaded_pdf_names_the_recipient_on_every_page(runtime):
    rt, _, client, grant, (pdf, *_) = portal_for(runtime, configured=True)
    answer = client.get(f"/documents/{pdf.id}/download")
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/pdf"
    assert answer.headers["Content-Length"] == str(len(answer.data))
    reader = PdfReader(io.BytesIO(answer.data))
    assert len(reader.pages) == 3
    for page, text in zip(reader.pages, ("Plan of care", "Exercises", "Follow-up"), strict=True):
        extracted = page.extract_text()
        assert text in extracted  # the document's own text is still there
        assert expected_line(grant.share_id) in extracted
    # The stored original is untouched: it still decrypts to the sender's bytes.
    stored = b"".join(rt.documents.open(pdf.blob_id, bytes(pdf.blob_key)))
    assert stored == PDF and expected_line(grant.share_id).encode() not in stored


def test_the_framed_pdf_is_stamped_too_and_the_audit_says_so(runtime):
    _, _, client, grant, (pdf, *_) = portal_for(runtime, configured=True)
    answer = client.get(f"/documents/{pdf.id}/inline")
    reader = PdfReader(io.BytesIO(answer.data))
    assert len(reader.pages) == 3
    assert expected_line(grant.share_id) in reader.pages[0].extract_text()
    event = AuditEvent.get(AuditEvent.kind == "document_viewed")
    assert event.detail == {"watermark": True}


def test_each_recipient_gets_their_own_address_on_the_copy(runtime):
    rt, app, _, _, _ = portal_for(runtime, configured=True)
    jones = make_account(rt, "dr.jones@ortho.example")
    share, _ = make_share(rt, recipients=("dr.jones@ortho.example",),
                          documents=[("plan.pdf", "pdf", "application/pdf", PDF)])
    claim(rt, share, "dr.jones@ortho.example", jones)
    document = share.documents.get()
    data = signed_in_client(app, rt, jones).get(f"/documents/{document.id}/download").data
    text = PdfReader(io.BytesIO(data)).pages[0].extract_text()
    assert f"Shared with dr.jones@ortho.example · {EXPECTED_DATE} · share {share.id}" in text
    assert SMITH not in text


def test_images_get_the_line_in_a_band_under_the_picture(runtime):
    _, _, client, _, (_, png, gif, _) = portal_for(runtime, configured=True)
    original = Image.open(io.BytesIO(PNG)).convert("RGB")
    stamped = Image.open(io.BytesIO(client.get(f"/documents/{png.id}/inline").data))
    assert stamped.format == "PNG"
    assert stamped.width == original.width and stamped.height > original.height
    stamped = stamped.convert("RGB")
    top = stamped.crop((0, 0, original.width, original.height))
    assert ImageChops.difference(top, original).getbbox() is None  # the picture untouched
    band = stamped.crop((0, original.height, stamped.width, stamped.height)).convert("L")
    assert band.getextrema()[0] < 160  # the text, dark on the white band
    animated = Image.open(io.BytesIO(client.get(f"/documents/{gif.id}/download").data))
    assert animated.format == "GIF" and animated.n_frames == 3
    assert animated.height > 200


def test_a_type_that_cannot_be_stamped_is_served_as_it_is_and_the_viewer_says_so(runtime):
    _, _, client, _, (pdf, _, _, docx) = portal_for(runtime, configured=True)
    page = " ".join(client.get(f"/documents/{docx.id}").get_data(as_text=True).split())
    assert "(DOCX) cannot carry a watermark: it is served as it was shared" in page
    assert client.get(f"/documents/{docx.id}/download").data == b"PK\x03\x04 x"
    assert AuditEvent.get(AuditEvent.kind == "document_downloaded").detail == {
        "watermark": False}
    assert "This copy carries a watermark" in client.get(f"/documents/{pdf.id}").get_data(
        as_text=True)


def test_an_encrypted_or_broken_pdf_goes_out_unchanged(runtime):
    rt, app, _, _, _ = portal_for(runtime, configured=True)
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(PDF)))
    writer.encrypt(user_password="", owner_password=secrets.token_hex(8))
    locked = io.BytesIO()
    writer.write(locked)
    broken = b"%PDF-1.4\n" + secrets.token_bytes(2000)
    account = make_account(rt, "dr.late@ortho.example")
    share, _ = make_share(rt, recipients=("dr.late@ortho.example",), documents=[
        ("locked.pdf", "pdf", "application/pdf", locked.getvalue()),
        ("broken.pdf", "pdf", "application/pdf", broken)])
    claim(rt, share, "dr.late@ortho.example", account)
    client = signed_in_client(app, rt, account)
    first, second = share.documents.order_by(Document.position)
    assert client.get(f"/documents/{first.id}/download").data == locked.getvalue()
    assert client.get(f"/documents/{second.id}/download").data == broken


def test_watermarks_are_off_unless_configured(runtime):
    _, _, client, _, (pdf, png, _, docx) = portal_for(runtime, configured=False)
    assert client.get(f"/documents/{pdf.id}/download").data == PDF
    assert client.get(f"/documents/{png.id}/inline").data == PNG
    assert "watermark" not in client.get(f"/documents/{docx.id}").get_data(as_text=True)
    assert AuditEvent.get(AuditEvent.kind == "document_downloaded").detail == {}


@pytest.mark.parametrize(("configured", "clinic", "stamped"), [
    (False, "on", True), (True, "off", False), (True, "configuration", True)])
def test_a_clinics_own_setting_wins(runtime, configured, clinic, stamped):
    _, _, client, grant, (pdf, *_) = portal_for(runtime, configured=configured, clinic=clinic)
    data = client.get(f"/documents/{pdf.id}/download").data
    assert (data != PDF) is stamped
    text = PdfReader(io.BytesIO(data)).pages[0].extract_text()
    assert (expected_line(grant.share_id) in text) is stamped


def test_stamping_waits_its_turn_so_memory_stays_bounded(runtime):
    """Each stamped copy lives in memory while it is built: past STAMPING_AT_ONCE, a download
    waits for one to finish instead of adding another."""
    _, app, client, grant, (pdf, *_) = portal_for(runtime, configured=True)
    slots = app.extensions["mailbridge_stamping"]
    for _ in range(STAMPING_AT_ONCE):
        slots.acquire()  # as if that many large copies were being stamped
    answers: list = []
    waiting = threading.Thread(target=lambda: answers.append(
        client.get(f"/documents/{pdf.id}/download")))
    waiting.start()
    waiting.join(1.0)
    assert waiting.is_alive() and not answers  # still waiting for a free slot
    slots.release()
    waiting.join(15)
    assert not waiting.is_alive()
    assert expected_line(grant.share_id) in PdfReader(io.BytesIO(answers[0].data)).pages[
        0].extract_text()
    for _ in range(STAMPING_AT_ONCE - 1):
        slots.release()


def test_a_page_bomb_is_not_stamped():
    """Recipients can send documents back, so a PDF may come from anyone: thousands of empty
    pages in a small file would otherwise hold a portal thread for minutes."""
    writer = PdfWriter()
    for _ in range(watermark.MAX_PDF_PAGES + 1):
        writer.add_blank_page(612, 792)
    bomb = io.BytesIO()
    writer.write(bomb)
    assert watermark.stamp("pdf", bomb.getvalue(), "Shared with x") is None
    assert watermark.stamp("pdf", pdf_of_pages("one"), "Shared with x") is not None


def test_a_line_too_long_for_the_page_still_fits_as_text():
    narrow = pdf_of_pages("x")
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(narrow)))
    writer.pages[0].mediabox.upper_right = (200, 200)
    out = io.BytesIO()
    writer.write(out)
    text = "Shared with " + "a" * 60 + "@example.org · 28 Nov 2026 · share 7"
    stamped = watermark.stamp("pdf", out.getvalue(), text)
    assert text in PdfReader(io.BytesIO(stamped)).pages[0].extract_text()


# --- a real browser ---------------------------------------------------------------------------


def test_chromium_downloads_a_stamped_pdf(runtime, browser):
    rt, app, _, grant, (pdf, *_) = portal_for(runtime, configured=True)
    sid = secrets.token_urlsafe(32)
    WebSession.create(id_hash=tokens.hash_token(sid), account=grant.account, data={},
                      created_at=rt.clock(), last_seen_at=rt.clock())
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        context = browser.new_context(accept_downloads=True)
        context.add_cookies([{"name": "mb_session", "value": sid, "url": base}])
        page = context.new_page()
        page.goto(f"{base}/documents/{pdf.id}")
        assert "This copy carries a watermark" in page.inner_text("main")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "watermark-viewer.png"), full_page=True)
        with page.expect_download() as download:
            page.click("text=Download")
        data = open(download.value.path(), "rb").read()
        assert download.value.suggested_filename == "plan.pdf"
        reader = PdfReader(io.BytesIO(data))
        assert len(reader.pages) == 3
        assert all(expected_line(grant.share_id) in p.extract_text() for p in reader.pages)
        context.close()
    finally:
        server.shutdown()


def test_a_stamped_copy_is_never_written_back(runtime):
    """A stamped copy is never written back: the next download stamps the original again."""
    rt, _, client, grant, (pdf, *_) = portal_for(runtime, configured=True)
    first = client.get(f"/documents/{pdf.id}/download").data
    second = client.get(f"/documents/{pdf.id}/download").data
    assert PdfReader(io.BytesIO(second)).pages[0].extract_text().count("Shared with") == 1
    assert len(first) == len(second)
    assert Document.get_by_id(pdf.id).sha256 == put_bytes(rt.documents, PDF).sha256


# --- the staff console ------------------------------------------------------------------------


def test_a_clinic_admin_turns_watermarks_on_in_the_console(runtime):
    rt, app, client, grant, (pdf, *_) = portal_for(runtime, configured=False)
    admin = grant.share.sender
    admin.is_admin = True
    admin.save()
    sid = secrets.token_urlsafe(32)
    WebSession.create(id_hash=tokens.hash_token(sid), member=admin, data={},
                      created_at=rt.clock(), last_seen_at=rt.clock())
    staff = app.test_client()
    staff.set_cookie("mb_session", sid)
    page = staff.get("/staff/clinic/settings").get_data(as_text=True)
    assert '<option value="configuration" selected>As the server is configured (off)' in page
    form = {"csrf_token": form_token(page), "timezone": "America/New_York", "claim_hours": "24",
            "contact": "", "display_name": "", "watermark": "on"}
    assert staff.post("/staff/clinic/settings", data=form).status_code == 302
    assert '<option value="on" selected>On' in staff.get("/staff/clinic/settings").get_data(
        as_text=True)
    event = AuditEvent.get(AuditEvent.kind == "clinic_changed")
    assert event.detail["watermark"] is True
    data = client.get(f"/documents/{pdf.id}/download").data
    assert expected_line(grant.share_id) in PdfReader(io.BytesIO(data)).pages[0].extract_text()
    form["watermark"] = "sideways"
    refused = staff.post("/staff/clinic/settings", data=form)
    assert refused.status_code == 400 and "must be on, off or configuration" in refused.get_data(
        as_text=True)
