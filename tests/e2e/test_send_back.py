"""Documents sent back, in a real browser (Playwright + Debian's Chromium): a recipient signs
the plan of care and sends it back from the library; the member's e-mail arrives at the SMTP
sink threaded under the receipt, and the member opens the document in the staff console — or,
without a console account, through a portal link to their own address. A wrong file type gets
a page saying so. Screenshots land in test-artifacts/ with the other browser tests'."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mailbridge.clock import system_clock
from mailbridge.shares import records
from mailbridge.store.models import Account, AuditEvent, SentBack, Share, StaffAccount
from mailbridge.web.passwords import hash_password
from tests.conftest import ARTIFACTS, free_port, start_service
from tests.e2e.test_portal import mail_to
from tests.helpers import MEMBER, add_jane, one_page_pdf, share_message
from tests.portal_helpers import PASSWORD, claim, make_account

DOCTOR = "dr.smith@ortho.example"
STAFF_PASSWORD = "staff console passphrase 7"
CODE = re.compile(r"\b(\d{6})\b")
DESKTOP = {"width": 1100, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture
def live(tmp_path, sink, keyring):
    port = free_port()
    running = start_service(tmp_path, f"sqlite:///{tmp_path / 'mb.db'}", sink, keyring,
                            MAILBRIDGE_WEB_PORT=str(port),
                            MAILBRIDGE_SERVICE_BASE_URL=f"http://127.0.0.1:{port}")
    running.base = f"http://127.0.0.1:{port}"
    yield running
    running.service.stop(timeout=10)


def shot(page, name: str, phone: bool = False) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"sendback-{name}.png"), full_page=True)
    if phone:
        page.set_viewport_size(PHONE)
        page.screenshot(path=str(ARTIFACTS / f"sendback-{name}-phone.png"), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), name
        page.set_viewport_size(DESKTOP)


def _shared_and_claimed(live):
    """Jane shares a plan of care with the doctor (over SMTP), who has claimed it."""
    live.send(share_message(recipients=[DOCTOR], subject="POC Rose Taylor",
                            note="Please sign and return.",
                            attachments=[("Plan of care.pdf", one_page_pdf("Plan"))]))
    mail_to(live.sink, DOCTOR, 1)
    receipt = mail_to(live.sink, MEMBER, 1)[0].message
    share = Share.get()
    claim(live.runtime, share, DOCTOR, make_account(live.runtime, DOCTOR))
    return share, receipt


def _doctor_sends_back(live, browser, share, tmp_path, signed: bytes):
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.goto(f"{live.base}/signin")
    page.fill("input[name=email]", DOCTOR)
    page.fill("input[name=password]", PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/library")
    page.get_by_role("link", name="Send documents back to Jane Doe").click()
    page.wait_for_url(f"**/library/shares/{share.id}/send-back")
    shot(page, "01-form", phone=True)

    # A wrong type first: named, with the accepted types, and nothing stored.
    script = tmp_path / "signed.pdf"
    script.write_bytes(b"MZ\x90\x00" + bytes(range(256)) * 16)
    page.set_input_files("#files", str(script))
    page.get_by_role("button", name="Send to Jane Doe").click()
    alert = page.get_by_role("alert").inner_text()
    assert "Nothing was sent: “signed.pdf” is not a type that can be sent." in alert
    assert not SentBack.select().exists()
    shot(page, "02-wrong-type")

    signed_file = tmp_path / "Plan of care - signed.pdf"
    signed_file.write_bytes(signed)
    page.set_input_files("#files", str(signed_file))
    page.fill("#message", "Signed on page 1.")
    page.get_by_role("button", name="Send to Jane Doe").click()
    page.wait_for_url("**/library")
    assert "1 document sent to Jane Doe. They have been told by e-mail." in page.content()
    shot(page, "03-sent")
    context.close()


def _threaded_mail(live, receipt, count: int):
    mail = mail_to(live.sink, MEMBER, count)[-1].message
    assert mail["Subject"] == f"Re: {receipt['Subject']}"
    assert mail["In-Reply-To"] == receipt["Message-ID"]
    assert mail["References"] == receipt["Message-ID"]
    body = mail.get_body(("plain",)).get_content()
    assert f"{DOCTOR} sent 1 document back to you" in body
    assert "Plan of care - signed.pdf (PDF," in body and "Signed on page 1." in body
    return body


def test_sent_back_and_opened_in_the_staff_console(live, browser, tmp_path):
    jane = add_jane()
    now = system_clock()
    StaffAccount.create(member=jane, password_hash=hash_password(STAFF_PASSWORD),
                        created_at=now, verified_at=now)
    share, receipt = _shared_and_claimed(live)
    signed = one_page_pdf("Plan - signed by Dr Smith")
    _doctor_sends_back(live, browser, share, tmp_path, signed)

    body = _threaded_mail(live, receipt, 2)
    url = re.search(r"http://127\.0\.0\.1:\d+/staff/returns/\d+", body).group(0)
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    page = context.new_page()
    page.goto(url)
    page.wait_for_url("**/staff")  # sign in first
    page.fill("#email", MEMBER)
    page.fill("#password", STAFF_PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.wait_for_url(url)  # straight to the page the e-mail linked
    # The share's console page lists what was sent back on it.
    page.get_by_role("link", name=f"Share #{share.id}").click()
    page.get_by_role("link", name=f"1 document from {DOCTOR}").click()
    assert page.url == url
    assert f"Documents sent back by {DOCTOR}" in page.content()
    assert "Signed on page 1." in page.content()
    shot(page, "04-console", phone=True)
    with page.expect_download() as download:
        page.get_by_role("link", name="Download Plan of care - signed.pdf").click()
    assert download.value.suggested_filename == "Plan of care - signed.pdf"
    assert Path(download.value.path()).read_bytes() == signed
    with context.expect_page() as opened:
        page.get_by_role("link", name="View Plan of care - signed.pdf").click()
    viewer = opened.value
    viewer.wait_for_load_state("load")
    viewer.wait_for_timeout(500)  # let the PDF viewer paint
    shot(viewer, "05-console-view")
    context.close()

    # `shares audit ID` reads these rows: the exchange is on the original share.
    trail = [(r["kind"], r["actor"], r["document"]) for r in
             records.rows(live.runtime, records.Selection(share_id=share.id))]
    assert ("documents_returned", DOCTOR, "") in trail
    assert ("returned_document_downloaded", MEMBER, "Plan of care - signed.pdf") in trail
    assert ("returned_document_viewed", MEMBER, "Plan of care - signed.pdf") in trail


def test_a_member_without_a_console_account_gets_a_portal_link(live, browser, tmp_path):
    add_jane()
    share, receipt = _shared_and_claimed(live)
    signed = one_page_pdf("Plan - signed by Dr Smith")
    _doctor_sends_back(live, browser, share, tmp_path, signed)

    body = _threaded_mail(live, receipt, 2)
    assert "/staff/returns/" in body  # also waiting in the console once she sets it up
    url = re.search(r"http://127\.0\.0\.1:\d+/s/[A-Za-z0-9_-]+", body).group(0)
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    page = context.new_page()
    page.goto(url)
    page.get_by_role("button", name="Continue").click()
    page.get_by_role("button", name="Send me a code").click()
    code_mail = mail_to(live.sink, MEMBER, 3)[-1]
    page.fill("input[name=code]", CODE.search(str(code_mail.message["Subject"])).group(1))
    page.get_by_role("button", name="Confirm").click()
    page.fill("input[name=password]", PASSWORD)
    page.get_by_role("button", name="Create account and claim").click()
    page.wait_for_url("**/library")
    assert f"Sent back by {DOCTOR}: POC Rose Taylor" in page.content()
    assert "Send documents back" not in page.content()  # not back again to herself
    shot(page, "06-member-library")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download Plan of care - signed.pdf").click()
    assert Path(download.value.path()).read_bytes() == signed
    context.close()

    assert Account.get(Account.email == MEMBER)
    kinds = [r["kind"] for r in records.rows(live.runtime, records.Selection(share_id=share.id))]
    assert {"documents_returned", "claimed", "document_downloaded"} <= set(kinds)
    assert AuditEvent.select().where(AuditEvent.kind == "return_refused").count() == 1
    # Opening what was sent back to her is not reported to her as a recipient's first view:
    # the receipt, the documents sent back and her code, nothing more.
    live.drain()
    assert len([m for m in live.sink.messages if m.rcpt_tos == [MEMBER]]) == 3
