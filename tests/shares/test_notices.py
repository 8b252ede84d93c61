"""Every notice to a member names the share it is about (title, date, recipients) and is
threaded under that share's receipt with the receipt's subject; notices about a message that
made no share quote its subject and date. The recipient's "Ask for a new link" reaches the
sender once, the same way."""

from __future__ import annotations

from mailbridge.shares import lifecycle, notices, notify
from mailbridge.store.models import AuditEvent, Grant
from tests.helpers import MEMBER, add_jane, share_message
from tests.portal_helpers import make_app
from tests.shares.test_notify import (
    FILENAME,
    JONES,
    NOTE,
    SMITH,
    TITLE,
    configured,
    grant_of,
    link_token,
    sent,
    shared,
    text_of,
)

RECEIPT_SUBJECT = f"Shared: {TITLE}"


def assert_about_the_share(message, share) -> None:
    assert message["Subject"] == f"Re: {RECEIPT_SUBJECT}"
    assert message["In-Reply-To"] == share.receipt_message_id
    assert message["References"] == share.receipt_message_id
    text = text_of(message)
    assert text.startswith(f"Share: {TITLE}\nShared: Sat 28 Nov 2026, 07:00 EST\n"
                           f"Recipients: {SMITH}, {JONES}\n"), text[:200]
    html = message.get_body(("html",)).get_content()
    assert TITLE in html and f"{SMITH}, {JONES}" in html
    for secret in (FILENAME, NOTE):
        assert secret not in text and secret not in html


def test_every_member_notice_names_the_share_and_threads_under_its_receipt(runtime):
    rt = configured(runtime)
    share = shared(rt, recipients=(SMITH, JONES))
    [(_, receipt)] = sent(rt, "receipt")
    assert receipt["Subject"] == RECEIPT_SUBJECT
    grant = grant_of(share, SMITH)
    Grant.update(claimed_at=rt.clock(), state="claimed").where(Grant.id == grant.id).execute()
    notify.first_view(rt, grant_of(share, SMITH))
    Grant.update(state="expired").where(Grant.address == JONES).execute()
    notify.expiry_summary(rt, share.id)
    with rt.db.atomic():
        notify.link_failed(rt, grant_of(share, JONES).id, event="link_bounced",
                           reason="550 5.1.1 no such user", detail={})
    colleague = add_admin(share)
    with rt.db.atomic():
        result = lifecycle.revoke(rt, share, address=SMITH, actor=colleague.email)
        notices.colleague_acted(rt, share, colleague, "revoke dr.smith", result.summary,
                                result.lines)
    kinds = ("first_view", "expiry_summary", "notice")
    found = [message for kind in kinds for _, message in sent(rt, kind)]
    assert len(found) == 4
    for message in found:
        assert_about_the_share(message, share)
    colleague_note = text_of(found[-1])
    assert "Pat Lee (pat.lee@clinic.example), an administrator of your clinic" in colleague_note
    assert f"Access withdrawn from {SMITH}." in colleague_note


def add_admin(share):
    from mailbridge.clock import system_clock
    from mailbridge.shares.members import add_member

    return add_member("pat.lee@clinic.example", "Pat Lee", share.clinic.name, system_clock(),
                      admin=True)


def test_a_notice_about_a_message_that_made_no_share_quotes_its_subject_and_date(runtime):
    from mailbridge.receive import spool, worker

    rt = configured(runtime)
    add_jane()
    message = share_message(recipients=[], subject="Referral for T.R.", note="x",
                            attachments=[("a.pdf", None)])
    message.replace_header("Date", "Sat, 28 Nov 2026 06:55:00 -0500")
    spool.enqueue(rt, bytes(message), channel="smtp", envelope_from=MEMBER,
                  envelope_to=["share@portal.example"])
    worker.run_once(rt, "test")
    [(_, notice)] = sent(rt, "notice")
    text = text_of(notice)
    assert text.startswith("Your e-mail: Referral for T.R.\nSent: Sat 28 Nov 2026, 06:55 EST\n")
    assert notice["In-Reply-To"] == message["Message-ID"]
    assert notice.get_body(("html",)) is not None


def test_ask_for_a_new_link_tells_the_sender_once_threaded_under_the_receipt(runtime):
    rt = configured(runtime)
    share = shared(rt, recipients=(SMITH, JONES))
    token = link_token(rt, grant_of(share, SMITH))
    client = make_app(rt).test_client()
    # Not while the link works: nothing to ask for, nobody is e-mailed.
    client.post(f"/s/{token}/ask")
    assert sent(rt, "notice") == []
    rt.clock.advance(hours=25)
    page = client.get(f"/s/{token}").get_data(as_text=True)
    assert "Ask for a new link" in page and TITLE not in page
    answer = client.post(f"/s/{token}/ask").get_data(as_text=True)
    assert "has been asked to send you a new link" in answer and TITLE not in answer
    for _ in range(3):  # pressed again: the same page, no second e-mail
        assert "has been asked" in client.post(f"/s/{token}/ask").get_data(as_text=True)
    [(row, message)] = sent(rt, "notice")
    assert row.to_addr == MEMBER
    assert_about_the_share(message, share)
    text = text_of(message)
    assert f"{SMITH} opened an expired link" in text and f"resend {SMITH}" in text
    assert f"/staff/shares/{share.id}" in text
    events = list(AuditEvent.select().where(AuditEvent.kind == "resend_requested"))
    assert [e.detail["notified"] for e in events] == [True, False, False, False]
    assert {e.actor for e in events} == {SMITH}


def test_status_report_is_a_table_in_html_and_label_value_lines_in_text(runtime):
    from mailbridge.shares import status

    rt = configured(runtime)
    share = shared(rt, recipients=(SMITH, JONES))
    report = status.share_status(rt, share)
    text = report.text()
    for line in text.splitlines():
        assert "  " not in line.strip(), line  # nothing lined up with runs of spaces
    assert f"{SMITH}: pending\n  link sent: not yet\n  delivered to relay: not yet\n" in text
    from mailbridge.outbound import compose

    answer = compose.command_reply_email(
        rt.settings, to=MEMBER, command="status",
        values=dict(sender_name="Jane Doe", claim_hours="24", report=text, status=report),
        reply_address=None, in_reply_to=None, about=notices.share_ref(rt, share))
    html = answer.get_body(("html",)).get_content()
    assert html.count("<table") == 3  # one per recipient, one for the commands
    assert '<th scope="row"' in html and "opened in a browser" in html
