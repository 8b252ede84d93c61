"""The staff console in a real browser (Playwright + Debian's Chromium): a member signs in the
first time with an e-mailed code, sees what they shared and who opened it, revokes one
recipient, resends, extends, adds a passkey and signs in with it (Chromium's virtual
authenticator, over the DevTools protocol); a clinic admin revokes a colleague's share (the
colleague is told by e-mail), searches the audit trail and exports it, and disables a member,
who loses the console at once. Screenshots at desktop and phone sizes land in test-artifacts/."""

from __future__ import annotations

import csv
import io
import re
import time
from pathlib import Path

import pytest

from mailbridge.clock import system_clock
from mailbridge.shares.members import add_member
from mailbridge.store.models import AuditEvent, Grant, StaffAccount
from mailbridge.web.passwords import hash_password
from tests.conftest import ARTIFACTS, free_port, start_service
from tests.helpers import MEMBER, add_jane, one_page_pdf, share_message

DOCTOR = "dr.smith@ortho.example"
LAWYER = "counsel@law.example"
ADMIN = "pat.lee@clinic.example"
PASSWORD = "staff console passphrase 7"
CODE = re.compile(r"\b(\d{6})\b")
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1200, "height": 900}


@pytest.fixture
def live(tmp_path, sink, keyring):
    port = free_port()
    # "localhost", not 127.0.0.1: a passkey's relying party must be a domain name.
    running = start_service(tmp_path, f"sqlite:///{tmp_path / 'mb.db'}", sink, keyring,
                            MAILBRIDGE_WEB_PORT=str(port),
                            MAILBRIDGE_SERVICE_BASE_URL=f"http://localhost:{port}")
    running.base = f"http://localhost:{port}"
    yield running
    running.service.stop(timeout=10)


def mail_to(sink, address: str, count: int, timeout: float = 15.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in sink.messages if m.rcpt_tos == [address]]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) >= count, f"{count} e-mail(s) to {address}, got {len(found)}"
            return found
        time.sleep(0.05)


def shot(page, name: str, phone: bool = True) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"staff-{name}.png"), full_page=True)
    if phone:
        page.set_viewport_size(PHONE)
        page.screenshot(path=str(ARTIFACTS / f"staff-{name}-phone.png"), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), name
        page.set_viewport_size(DESKTOP)


def labelled(page) -> None:
    """Every visible field has a label a screen reader announces."""
    unlabelled = page.evaluate("""() => [...document.querySelectorAll(
        'input:not([type=hidden]), select, textarea')].filter(e => e.offsetParent !== null
        && !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.name)""")
    assert unlabelled == []


def test_member_signs_in_revokes_resends_extends_and_uses_a_passkey(live, browser):
    add_jane()
    live.send(share_message(recipients=[DOCTOR, LAWYER], subject="POC Rose Taylor",
                            attachments=[("Plan of care.pdf", one_page_pdf("Plan"))]))
    mail_to(live.sink, DOCTOR, 1)
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    page = context.new_page()

    # Keyboard only: from the skip link to the code request, without a mouse.
    page.goto(f"{live.base}/staff")
    labelled(page)
    shot(page, "01-signin")
    page.get_by_role("link", name="Get a code by e-mail").focus()
    page.keyboard.press("Enter")
    page.wait_for_url("**/staff/code")
    page.keyboard.press("Tab")  # the skip link first
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "email"
    page.keyboard.type(MEMBER)
    page.keyboard.press("Enter")
    page.wait_for_url("**/staff/code/enter")
    code_mail = mail_to(live.sink, MEMBER, 2)[-1]  # after the receipt
    code = CODE.search(str(code_mail.message["Subject"])).group(1)
    page.fill("#code", code)
    page.keyboard.press("Enter")
    page.wait_for_url("**/staff/password")
    labelled(page)
    page.fill("#password", PASSWORD)
    page.get_by_role("button", name="Save and sign in").click()
    page.wait_for_url("**/staff/sent")
    assert "POC Rose Taylor" in page.content()
    items = page.locator("ul.recipients li").all_inner_texts()
    assert any(DOCTOR in text for text in items) and any(LAWYER in text for text in items)
    shot(page, "02-sent")

    # Search by recipient, then open the share.
    page.fill("#q", "law.example")
    page.get_by_role("button", name="Search").click()
    page.get_by_role("link", name="POC Rose Taylor").click()
    shot(page, "03-share")

    # Revoke one recipient, with a confirmation page.
    page.get_by_role("link", name=f"Revoke {LAWYER}").click()
    shot(page, "04-confirm-revoke", phone=False)
    page.get_by_role("button", name="Yes, revoke").click()
    assert f"Access withdrawn from {LAWYER}." in page.content()
    assert Grant.get(Grant.address == LAWYER).state == "revoked"
    assert Grant.get(Grant.address == DOCTOR).state == "pending"
    event = AuditEvent.get(AuditEvent.kind == "grant_revoked")
    assert event.actor == MEMBER

    # Resend to the doctor: a new link e-mail, the old one dead.
    page.get_by_role("link", name=f"Resend to {DOCTOR}").click()
    page.get_by_role("button", name="Yes, resend").click()
    assert "New links sent to 1 recipient." in page.content()
    assert len(mail_to(live.sink, DOCTOR, 2)) == 2

    # Extend by 48 hours.
    page.get_by_role("link", name="Extend").click()
    page.fill("#hours", "48")
    page.get_by_role("button", name="Yes, extend").click()
    assert "1 unclaimed link extended by 48 hours." in page.content()
    shot(page, "05-after-actions")
    kinds = [e.detail["action"] for e in AuditEvent.select().where(
        AuditEvent.kind == "console_action").order_by(AuditEvent.seq)]
    assert kinds == ["revoke", "resend", "extend"]

    # A passkey, for real: Chromium's virtual authenticator through the DevTools protocol.
    cdp = context.new_cdp_session(page)
    cdp.send("WebAuthn.enable")
    cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
        "protocol": "ctap2", "transport": "internal", "hasResidentKey": True,
        "hasUserVerification": True, "isUserVerified": True}})
    page.get_by_role("link", name="Passkeys").click()
    page.get_by_role("button", name="Add a passkey").click()
    page.wait_for_selector("table.grid")
    shot(page, "06-passkeys", phone=False)
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/staff")
    page.get_by_role("button", name="Sign in with a passkey").click()
    page.wait_for_url("**/staff/sent")
    assert AuditEvent.select().where((AuditEvent.kind == "staff_signed_in")
                                     & (AuditEvent.actor == MEMBER)).count() == 2
    context.close()


def test_clinic_admin_acts_on_a_colleagues_share_searches_exports_and_disables(live, browser):
    jane = add_jane()
    admin = add_member(ADMIN, "Pat Lee", jane.clinic.name, system_clock(), admin=True)
    now = system_clock()
    StaffAccount.create(member=admin, password_hash=hash_password(PASSWORD), created_at=now,
                        verified_at=now)
    StaffAccount.create(member=jane, password_hash=hash_password(PASSWORD), created_at=now,
                        verified_at=now)
    live.send(share_message(recipients=[DOCTOR], subject="Referral for T.R."))
    mail_to(live.sink, DOCTOR, 1)
    receipt = mail_to(live.sink, MEMBER, 1)[0].message

    janes = browser.new_context(viewport=DESKTOP).new_page()
    janes.goto(f"{live.base}/staff")
    janes.fill("#email", MEMBER)
    janes.fill("#password", PASSWORD)
    janes.get_by_role("button", name="Sign in", exact=True).click()
    janes.wait_for_url("**/staff/sent")
    assert "Clinic shares" not in janes.content()  # not an admin

    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    page = context.new_page()
    page.goto(f"{live.base}/staff")
    page.fill("#email", ADMIN)
    page.fill("#password", PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.get_by_role("link", name="Clinic shares").click()
    assert "from Jane Doe" in page.content()
    shot(page, "07-clinic-shares")
    page.get_by_role("link", name="Referral for T.R.").click()
    assert "This is Jane Doe's share" in page.content()
    page.get_by_role("link", name="Revoke all").click()
    page.get_by_role("button", name="Yes, revoke").click()
    assert "Jane Doe has been told by e-mail." in page.content()
    told = mail_to(live.sink, MEMBER, 2)[-1].message
    assert told["Subject"] == f"Re: {receipt['Subject']}"
    assert told["In-Reply-To"] == receipt["Message-ID"]
    body = told.get_body(("plain",)).get_content()
    assert "Share: Referral for T.R." in body and "Pat Lee (pat.lee@clinic.example)" in body

    # The audit trail: search by recipient, export what was found.
    page.get_by_role("link", name="Audit trail").click()
    labelled(page)
    page.fill("#recipient", DOCTOR)
    page.get_by_role("button", name="Search").click()
    rows = page.locator("table.grid tbody tr").all_inner_texts()
    assert rows and all(DOCTOR in row or "grant" in row for row in rows)
    assert any("grant revoked" in row and ADMIN in row for row in rows)
    shot(page, "08-audit")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download these events as CSV").click()
    exported = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert {"grant_revoked", "grant_created"} <= {row["kind"] for row in exported}
    assert all(row["time_local"] and row["time_utc"].endswith("Z") for row in exported)
    assert all(row["recipient"] == DOCTOR or row["actor"] == DOCTOR for row in exported)

    # Settings: a wrong time zone is refused naming the field; the contact line is saved.
    page.get_by_role("link", name="Settings").click()
    labelled(page)
    page.fill("#timezone", "Mars/Olympus")
    page.get_by_role("button", name="Save settings").click()
    assert "is not an IANA time zone" in page.content()
    page.fill("#timezone", "America/Chicago")
    page.fill("#contact", "Front desk: (555) 010-0200")
    page.get_by_role("button", name="Save settings").click()
    assert "settings are saved" in page.content()
    shot(page, "09-settings")

    # Members: disable Jane; her open console is gone on her next click.
    page.get_by_role("link", name="Members").click()
    shot(page, "10-members")
    page.get_by_role("button", name=f"Disable {MEMBER}").click()
    assert "is disabled" in page.content()
    janes.reload()
    assert janes.url.endswith("/staff") and "Sign in" in janes.content()
    context.close()
