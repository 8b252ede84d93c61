"""A forwarded link asks instead of dead-ending, in a real browser (Playwright + Debian's
Chromium) against the whole service: the assistant the physician forwarded the link to asks
for access for her own address, proves it with the code from her mailbox, the sender approves
by replying over real SMTP (DKIM-signed), and the assistant claims the link of her own.

Screenshots land in test-artifacts/ beside the other portal screenshots."""

from __future__ import annotations

import re
from email.message import EmailMessage
from email.utils import make_msgid

from mailbridge.store.models import AccessRequest, AuditEvent, Grant
from tests.e2e.test_portal import CODE, live, mail_to, shot, text_of  # noqa: F401 - fixture
from tests.helpers import MEMBER, add_jane, one_page_pdf, share_message
from tests.portal_helpers import PASSWORD

DOCTOR = "dr.smith@ortho.example"
ASSISTANT = "ma.lopez@ortho.example"
LINK = re.compile(r"http://127\.0\.0\.1:\d+/s/[A-Za-z0-9_-]+")


def test_forwarded_link_request_code_approve_by_reply_own_link(live, browser):  # noqa: F811
    add_jane()
    live.send(share_message(recipients=[DOCTOR], subject="POC Rose Taylor",
                            note="Please review.",
                            attachments=[("Plan of care.pdf", one_page_pdf("Plan"))]))
    [link_mail] = mail_to(live.sink, DOCTOR, 1)
    forwarded = LINK.search(text_of(link_mail)).group(0)

    # The assistant opens the forwarded link and asks for access for her own address.
    page = browser.new_context(viewport={"width": 1100, "height": 900}).new_page()
    page.goto(forwarded)
    shot(page, "20-forwarded-link")
    page.get_by_role("link", name="Request access for my own address").click()
    assert page.url == forwarded + "/request"
    assert "Rose Taylor" not in page.content() and DOCTOR not in page.content()
    page.fill("input[name=email]", ASSISTANT)
    page.fill("input[name=name]", "Maria Lopez, medical assistant")
    shot(page, "21-request-access")
    page.get_by_role("button", name="Send me a code").click()

    [code_mail] = mail_to(live.sink, ASSISTANT, 1)
    assert "Rose Taylor" not in code_mail.raw.decode(errors="replace")
    page.fill("input[name=code]", CODE.search(str(code_mail.message["Subject"])).group(1))
    shot(page, "22-request-code")
    page.get_by_role("button", name="Confirm and send the request").click()
    assert "Your request was sent" in page.content()
    shot(page, "23-request-sent")

    # The sender gets the request, naming who asked, from which address, through whose link.
    asks = [m for m in mail_to(live.sink, MEMBER, 2)
            if "asks for access" in text_of(m)]
    assert len(asks) == 1
    request_text = " ".join(text_of(asks[0]).split())
    assert ASSISTANT in request_text and "Maria Lopez, medical assistant" in request_text
    assert f"the one sent to {DOCTOR}" in request_text and "POC Rose Taylor" in request_text

    # She answers the way a mail client does: a reply to that e-mail, over SMTP, signed.
    answer = EmailMessage()
    answer["From"] = f"Jane Doe <{MEMBER}>"
    answer["To"] = str(asks[0].message["Reply-To"])
    answer["Subject"] = "Re: " + str(asks[0].message["Subject"])
    answer["Message-ID"] = make_msgid(domain="clinic.example")
    answer["In-Reply-To"] = asks[0].message["Message-ID"]
    answer["References"] = asks[0].message["Message-ID"]
    answer.set_content("Approve\n\nOn Tue, 1 Dec 2026, mailbridge wrote:\n> deny\n")
    live.send(answer, rcpts=[asks[0].message["Reply-To"].addresses[0].addr_spec])

    own_mail = mail_to(live.sink, ASSISTANT, 2)[-1]
    own_link = LINK.search(text_of(own_mail)).group(0)
    assert own_link != forwarded and "Rose Taylor" not in own_mail.raw.decode(errors="replace")
    request = AccessRequest.get()
    grant = Grant.get(Grant.address == ASSISTANT)
    assert request.state == "approved" and request.grant_id == grant.id
    created = AuditEvent.get((AuditEvent.kind == "grant_created") & (AuditEvent.grant == grant))
    assert created.detail["origin_grant"] == Grant.get(Grant.address == DOCTOR).id

    # Her own link: code to her mailbox, a password, and the documents in her library.
    page.goto(own_link)
    shot(page, "24-own-link")
    page.get_by_role("button", name="Continue").click()
    page.get_by_role("button", name="Send me a code").click()
    claim_code = mail_to(live.sink, ASSISTANT, 3)[-1]
    page.fill("input[name=code]", CODE.search(str(claim_code.message["Subject"])).group(1))
    page.get_by_role("button", name="Confirm").click()
    page.fill("input[name=password]", PASSWORD)
    page.get_by_role("button", name="Create account and claim").click()
    page.wait_for_url("**/library")
    assert "POC Rose Taylor" in page.content()
    shot(page, "25-own-library")
    assert Grant.get(Grant.address == DOCTOR).state == "pending"  # the doctor's link is hers
    page.context.close()


def test_signed_in_elsewhere_asks_and_the_sender_denies_in_the_console(live, browser):  # noqa: F811
    from mailbridge.clock import system_clock
    from mailbridge.store.models import StaffAccount
    from mailbridge.web.passwords import hash_password
    from tests.e2e.test_staff_console import shot as staff_shot
    from tests.portal_helpers import make_account

    jane = add_jane()
    StaffAccount.create(member=jane, password_hash=hash_password(PASSWORD),
                        created_at=system_clock(), verified_at=system_clock())
    live.send(share_message(recipients=[DOCTOR], subject="Referral for T.R.",
                            attachments=[("referral.pdf", one_page_pdf("Referral"))]))
    [link_mail] = mail_to(live.sink, DOCTOR, 1)
    forwarded = LINK.search(text_of(link_mail)).group(0)

    # The assistant already has an account of her own and is signed in with it.
    make_account(live.runtime, ASSISTANT)
    page = browser.new_context(viewport={"width": 1100, "height": 900}).new_page()
    page.goto(f"{live.base}/signin")
    page.fill("input[name=email]", ASSISTANT)
    page.fill("input[name=password]", PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.goto(forwarded)
    page.get_by_role("button", name="Continue").click()
    assert "sent to someone else" in page.content() and "Referral" not in page.content()
    shot(page, "26-wrong-account-offers-request")
    page.get_by_role("link", name="Request access for my own address").click()
    assert page.input_value("input[name=email]") == ASSISTANT
    page.get_by_role("button", name="Send me a code").click()
    [code_mail] = mail_to(live.sink, ASSISTANT, 1)
    page.fill("input[name=code]", CODE.search(str(code_mail.message["Subject"])).group(1))
    page.get_by_role("button", name="Confirm and send the request").click()
    assert "Your request was sent" in page.content()

    # Jane answers in the staff console.
    staff = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
    staff.goto(f"{live.base}/staff")
    staff.fill("#email", MEMBER)
    staff.fill("#password", PASSWORD)
    staff.get_by_role("button", name="Sign in", exact=True).click()
    staff.wait_for_url("**/staff/sent")
    staff.get_by_role("link", name="Requests").click()
    assert ASSISTANT in staff.content() and f"the one sent to {DOCTOR}" in staff.content()
    staff_shot(staff, "20-requests")
    staff.get_by_role("link", name=f"Deny {ASSISTANT}").click()
    staff_shot(staff, "21-request-deny-confirm", phone=False)
    staff.get_by_role("button", name="Yes, deny").click()
    assert "Access refused" in staff.content() and "No request is waiting" in staff.content()

    refusal = mail_to(live.sink, ASSISTANT, 2)[-1]
    raw = refusal.raw.decode(errors="replace")
    assert "not granted" in str(refusal.message["Subject"])
    assert "Referral" not in raw and "referral.pdf" not in raw and DOCTOR not in raw
    assert AccessRequest.get().state == "denied"
    assert not Grant.select().where(Grant.address == ASSISTANT).exists()
    page.context.close()
    staff.context.close()
