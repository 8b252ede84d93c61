"""The recipient's whole journey in a real browser (Playwright + Debian's Chromium): a member's
message goes in over SMTP, the link comes out of the e-mail captured by the sink relay, and a
first-time recipient proves the mailbox, sets a password, views, downloads, archives and
restores — while a second person holding the forwarded link gets nowhere.

Screenshots land in test-artifacts/ (printed at the end of the run): they are what a
physician sees, so look at them."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from mailbridge.store.models import AuditEvent, Grant
from tests.conftest import ARTIFACTS, free_port, start_service
from tests.helpers import one_page_pdf, share_message
from tests.portal_helpers import PASSWORD, make_account

DOCTOR = "dr.smith@ortho.example"
CODE = re.compile(r"\b(\d{6})\b")


@pytest.fixture
def live(tmp_path, sink, keyring):
    port = free_port()
    running = start_service(tmp_path, f"sqlite:///{tmp_path / 'mb.db'}", sink, keyring,
                            MAILBRIDGE_WEB_PORT=str(port),
                            MAILBRIDGE_SERVICE_BASE_URL=f"http://127.0.0.1:{port}")
    running.base = f"http://127.0.0.1:{port}"
    yield running
    running.service.stop(timeout=10)


def text_of(received) -> str:
    return received.message.get_body(("plain",)).get_content()


def mail_to(sink, address: str, count: int, timeout: float = 15.0) -> list:
    """The first `count` e-mails the relay accepted for `address`, waiting for them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in sink.messages if m.rcpt_tos == [address]]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) >= count, f"{count} e-mail(s) to {address}, got {len(found)}"
            return found
        time.sleep(0.05)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_first_time_recipient_claims_views_downloads_and_archives(live, browser, tmp_path):
    from tests.helpers import add_jane

    add_jane()
    pdf = one_page_pdf("Plan of care")
    live.send(share_message(recipients=[DOCTOR], subject="POC Rose Taylor",
                            note="Please review before Monday.",
                            attachments=[("Plan of care.pdf", pdf)]))
    [link_mail] = mail_to(live.sink, DOCTOR, 1)
    url = re.search(r"http://127\.0\.0\.1:\d+/s/[A-Za-z0-9_-]+", text_of(link_mail)).group(0)

    context = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.goto(url)
    assert "Jane Doe at Riverside PT shared 1 document with you" in page.content()
    assert "Rose Taylor" not in page.content()
    shot(page, "01-link-page")

    page.get_by_role("button", name="Continue").click()
    page.get_by_role("button", name="Send me a code").click()
    code_mail = mail_to(live.sink, DOCTOR, 2)[-1]
    code = CODE.search(str(code_mail.message["Subject"])).group(1)
    assert "Rose Taylor" not in code_mail.raw.decode(errors="replace")
    page.fill("input[name=code]", code)
    shot(page, "02-code-page")
    page.get_by_role("button", name="Confirm").click()

    page.fill("input[name=password]", "password1234")  # long enough, but common
    page.get_by_role("button", name="Create account and claim").click()
    assert "too common" in page.content()
    page.fill("input[name=password]", PASSWORD)
    page.get_by_role("button", name="Create account and claim").click()
    page.wait_for_url("**/library")
    assert "POC Rose Taylor" in page.content() and "Please review before Monday." in page.content()
    assert Grant.get(Grant.address == DOCTOR).state == "claimed"
    shot(page, "03-library")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    shot(page, "03-library-phone")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.set_viewport_size({"width": 1100, "height": 900})

    page.get_by_role("link", name="View Plan of care.pdf").click()
    page.wait_for_load_state("load")
    assert any(frame.url.endswith("/inline") for frame in page.frames)
    page.wait_for_timeout(500)  # let the PDF viewer paint before the screenshot
    shot(page, "04-viewer")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download").first.click()
    assert download.value.suggested_filename == "Plan of care.pdf"
    assert Path(download.value.path()).read_bytes() == pdf

    page.get_by_role("link", name="Back to library").click()
    page.get_by_role("button", name="Archive").click()
    assert "POC Rose Taylor" not in page.content()
    page.get_by_role("link", name="Archived").click()
    assert "POC Rose Taylor" in page.content()
    page.get_by_role("button", name="Restore").click()
    page.goto(f"{live.base}/library")
    assert "POC Rose Taylor" in page.content()

    page.get_by_role("button", name="Sign out").first.click()
    page.goto(f"{live.base}/library")
    assert "/signin" in page.url
    kinds = {e.kind for e in AuditEvent.select()}
    assert {"link_shown", "code_sent", "code_verified", "account_created", "claimed",
            "document_viewed", "document_downloaded", "share_archived", "share_restored",
            "signed_out"} <= kinds
    context.close()


def test_forwarded_link_gets_someone_else_nowhere(live, browser):
    from tests.helpers import add_jane

    add_jane()
    live.send(share_message(recipients=[DOCTOR], attachments=[("plan.pdf", one_page_pdf("x"))]))
    [link_mail] = mail_to(live.sink, DOCTOR, 1)
    url = re.search(r"http://127\.0\.0\.1:\d+/s/[A-Za-z0-9_-]+", text_of(link_mail)).group(0)

    # Someone without an account: the code goes to the doctor's mailbox, not to them.
    stranger = browser.new_context().new_page()
    stranger.goto(url)
    stranger.get_by_role("button", name="Continue").click()
    stranger.get_by_role("button", name="Send me a code").click()
    stranger.fill("input[name=code]", "000000")
    stranger.get_by_role("button", name="Confirm").click()
    assert "password" not in (stranger.locator("input").evaluate_all(
        "els => els.map(e => e.name)"))
    stranger.goto(url.rsplit("/s/", 1)[0] + "/library")
    assert "/signin" in stranger.url

    # Someone signed in with their own account: "sent to someone else", nothing shown.
    make_account(live.runtime, "office@lawfirm.example")
    other = browser.new_context().new_page()
    other.goto(url.rsplit("/s/", 1)[0] + "/signin")
    other.fill("input[name=email]", "office@lawfirm.example")
    other.fill("input[name=password]", PASSWORD)
    other.get_by_role("button", name="Sign in").click()
    other.goto(url + "/next")
    content = other.content()
    assert "sent to someone else" in content and "Riverside" not in content
    shot(other, "05-wrong-account")
    assert Grant.get(Grant.address == DOCTOR).state == "pending"
    assert AuditEvent.select().where(AuditEvent.kind == "access_denied").count() >= 1
