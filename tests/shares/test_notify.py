"""What mailbridge sends on its own about a share: the recipient's reminder (with the same
link, recovered from the sealed link e-mail), and the sender's first-view, expiry-summary and
delivery-failure notices — each once, threaded under the receipt, without PHI."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from email import policy
from email.parser import BytesParser

from mailbridge.clock import ManualClock
from mailbridge.outbound import compose, outbox
from mailbridge.receive import spool, worker
from mailbridge.shares import notify
from mailbridge.store import tokens
from mailbridge.store.models import AuditEvent, Document, Grant, OutboundMessage, Share
from tests.helpers import MEMBER, add_jane, share_message
from tests.portal_helpers import make_account, make_app, signed_in_client

START = dt.datetime(2026, 11, 28, 12, 0)
SMITH = "dr.smith@ortho.example"
JONES = "dr.jones@ortho.example"
TITLE = "POC for patient Rose Taylor"
FILENAME = "Rose Taylor plan.pdf"
NOTE = "SECRET-NOTE-4411"
LINK = re.compile(r"http://portal\.example/s/([A-Za-z0-9_-]{43})")


# --- helpers shared with test_jobs and test_bounces -----------------------------------------


def configured(runtime, clock: ManualClock | None = None, **sections: dict):
    """The test runtime on a manual clock, with settings changed per section, e.g.
    `shares={"remind_before_hours": 0}`. Sender authentication is off: these tests share
    through the real pipeline without DKIM."""
    settings = runtime.settings
    changes = {"senders": dataclasses.replace(settings.senders, require_authentication=False)}
    for name, values in sections.items():
        changes[name] = dataclasses.replace(getattr(settings, name), **values)
    return dataclasses.replace(runtime, settings=dataclasses.replace(settings, **changes),
                               clock=clock or ManualClock(START))


def shared(runtime, recipients=(SMITH,), subject: str = TITLE) -> Share:
    """A share made the real way: a member's message spooled and run through the pipeline."""
    if not Share.select().exists():
        add_jane()
    msg = share_message(recipients=recipients, subject=subject, note=NOTE,
                        attachments=[(FILENAME, None)])
    spool.enqueue(runtime, bytes(msg), channel="smtp", envelope_from=MEMBER,
                  envelope_to=["share@portal.example"])
    assert worker.run_once(runtime, "test")
    return Share.select().order_by(Share.id.desc()).first()


def grant_of(share: Share, address: str) -> Grant:
    return Grant.get((Grant.share == share) & (Grant.address == address))


def sent(runtime, kind: str) -> list:
    """The queued e-mails of one kind, opened: (row, parsed message)."""
    rows = OutboundMessage.select().where(OutboundMessage.kind == kind).order_by(OutboundMessage.id)
    return [(row, BytesParser(policy=policy.default).parsebytes(outbox.open_message(runtime, row)))
            for row in rows]


def text_of(message) -> str:
    return message.get_body(("plain",)).get_content().replace("\r\n", "\n")


def link_token(runtime, grant: Grant) -> str:
    [(_, message)] = [(r, m) for r, m in sent(runtime, "link") if r.grant_id == grant.id]
    return LINK.search(text_of(message)).group(1)


# --- reminders -------------------------------------------------------------------------------


def test_reminder_carries_the_same_link_and_no_phi(runtime):
    rt = configured(runtime)
    share = shared(rt)
    grant = grant_of(share, SMITH)
    token = link_token(rt, grant)
    assert notify.remind(rt, grant.id)
    [(row, message)] = sent(rt, "reminder")
    assert (row.to_addr, row.grant_id) == (SMITH, grant.id)
    body = text_of(message)
    assert f"http://portal.example/s/{token}" in body
    assert "Sun 29 Nov 2026, 07:00 EST" in body  # the deadline, in the clinic's time zone
    assert "Reminder" in message["Subject"] and "Riverside PT" in message["Subject"]
    whole = bytes(message).decode()
    for secret in (TITLE, FILENAME, NOTE, "Rose Taylor"):
        assert secret not in whole and secret not in body
    assert row.envelope_from.startswith("bounce+")  # a bounce of it marks the grant too
    assert Grant.get_by_id(grant.id).reminded_at == rt.clock()
    assert not notify.remind(rt, grant.id)  # once
    assert len(sent(rt, "reminder")) == 1


def test_reminder_follows_a_replaced_link_and_never_sends_a_dead_one(runtime):
    rt = configured(runtime)
    share = shared(rt)
    grant = grant_of(share, SMITH)
    # A new token (as `resend` makes) with its own link e-mail: the reminder has the new link.
    new_token = tokens.new_link_token()
    with rt.db.atomic():
        Grant.update(token_hash=tokens.hash_token(new_token)).where(Grant.id == grant.id).execute()
        msg = compose.link_email(rt.settings, to=SMITH,
                                 link_url=f"http://portal.example/s/{new_token}",
                                 clinic_name="Riverside PT", sender_name="Jane Doe",
                                 document_count=1, deadline_text="soon")
        outbox.enqueue(rt, msg, kind="link", to_addr=SMITH, share=share, grant=grant)
    link, _ = notify.current_link(rt, Grant.get_by_id(grant.id))
    assert link == f"http://portal.example/s/{new_token}"

    # A token no link e-mail carries: the reminder points to the first e-mail instead.
    Grant.update(token_hash=tokens.hash_token("x" * 43)).where(Grant.id == grant.id).execute()
    assert notify.remind(rt, grant.id)
    [(_, message)] = sent(rt, "reminder")
    body = text_of(message)
    assert "/s/" not in body and "open the link in the e-mail we sent to" in body
    assert "Sat 28 Nov 2026, 07:00 EST" in body  # when the first e-mail went out


def test_no_reminder_for_a_claimed_grant(runtime):
    rt = configured(runtime)
    grant = grant_of(shared(rt), SMITH)
    Grant.update(state="claimed", claimed_at=rt.clock()).where(Grant.id == grant.id).execute()
    assert not notify.remind(rt, grant.id)
    assert sent(rt, "reminder") == []


# --- first view ------------------------------------------------------------------------------


def _viewer(rt, share, address):
    account = make_account(rt, address)
    (Grant.update(state="claimed", account=account, claimed_at=rt.clock())
     .where((Grant.share == share) & (Grant.address == address)).execute())
    return signed_in_client(make_app(rt), rt, account)


def test_first_view_tells_the_sender_once_threaded_under_the_receipt(runtime):
    rt = configured(runtime)
    share = shared(rt, recipients=(SMITH, JONES))
    document = Document.get(Document.share == share)
    rt.clock.advance(hours=2)
    smith = _viewer(rt, share, SMITH)
    assert smith.get(f"/documents/{document.id}/inline").status_code == 200
    assert smith.get(f"/documents/{document.id}/inline").status_code == 200
    assert smith.get(f"/documents/{document.id}/download").status_code == 200
    [(row, message)] = sent(rt, "first_view")
    assert (row.to_addr, row.share_id) == (MEMBER, share.id)
    assert message["In-Reply-To"] == share.receipt_message_id
    assert message["References"] == share.receipt_message_id
    # Filed under the receipt with its subject, naming the share: every client groups them.
    assert message["Subject"] == f"Re: Shared: {TITLE}"
    body = text_of(message)
    assert f"Share: {TITLE}\nShared: Sat 28 Nov 2026, 07:00 EST\n" in body
    assert f"Recipients: {SMITH}, {JONES}" in body
    assert f"{SMITH} opened the documents you shared on Sat 28 Nov 2026, 07:00 EST" in body
    assert "first opened Sat 28 Nov 2026, 09:00 EST" in body
    for secret in (FILENAME, NOTE):  # the receipt lists the files; notices need not
        assert secret not in bytes(message).decode()
    assert rt.wake_dispatcher.is_set()

    # The other recipient's first download is its own notice.
    jones = _viewer(rt, share, JONES)
    assert jones.get(f"/documents/{document.id}/download").status_code == 200
    assert [r.grant_id for r, _ in sent(rt, "first_view")] == [
        grant_of(share, SMITH).id, grant_of(share, JONES).id]


def test_first_view_notice_can_be_turned_off_and_old_views_stay_old(runtime):
    rt = configured(runtime, notifications={"first_view": False})
    share = shared(rt)
    document = Document.get(Document.share == share)
    client = _viewer(rt, share, SMITH)
    assert client.get(f"/documents/{document.id}/inline").status_code == 200
    assert sent(rt, "first_view") == []
    assert grant_of(share, SMITH).first_view_reported_at == rt.clock()
    # Turned on later: a view that is not the first is not reported as one.
    on = configured(runtime, rt.clock, notifications={"first_view": True})
    assert not notify.first_view(on, grant_of(share, SMITH))
    assert sent(rt, "first_view") == []


# --- expiry summary --------------------------------------------------------------------------


def test_expiry_summary_lists_the_lapsed_recipients_and_invites_resend(runtime):
    rt = configured(runtime)
    share = shared(rt, recipients=(SMITH, JONES, "claims@insurer.example"))
    Grant.update(state="claimed").where(Grant.address == "claims@insurer.example").execute()
    Grant.update(state="expired").where(Grant.address.in_([SMITH, JONES])).execute()
    assert notify.expiry_summary(rt, share.id) == 2
    [(row, message)] = sent(rt, "expiry_summary")
    assert (row.to_addr, row.share_id) == (MEMBER, share.id)
    assert message["In-Reply-To"] == share.receipt_message_id
    assert message["Reply-To"] == "mailbridge@portal.example"
    assert message["Subject"] == f"Re: Shared: {TITLE}"
    body = text_of(message)
    assert f"Share: {TITLE}\n" in body
    lapsed = body.split("claimed them:")[1].split("can no longer")[0]
    assert f"- {SMITH}\n" in lapsed and f"- {JONES}\n" in lapsed
    assert "claims@insurer.example" not in lapsed
    assert "resend <address>" in body
    assert notify.expiry_summary(rt, share.id) == 0
    assert len(sent(rt, "expiry_summary")) == 1
    event = AuditEvent.get(AuditEvent.kind == "expiry_reported")
    assert event.detail == {"recipients": 2, "notified": True}


# --- delivery failure ------------------------------------------------------------------------


def test_link_failure_is_reported_once_per_grant(runtime):
    rt = configured(runtime)
    share = shared(rt)
    grant = grant_of(share, SMITH)
    with rt.db.atomic():
        assert notify.link_failed(rt, grant.id, event="link_undeliverable",
                                         reason="550 5.1.1\n user unknown", detail={})
        assert not notify.link_failed(rt, grant.id, event="link_bounced",
                                             reason="again", detail={})
    assert Grant.get_by_id(grant.id).delivery == "failed"
    [(row, message)] = sent(rt, "notice")
    assert row.to_addr == MEMBER and message["In-Reply-To"] == share.receipt_message_id
    body = text_of(message)
    assert "the receiving\nserver refused it (status 5.1.1)" in body
    assert "user unknown" not in body  # the remote server's words are not repeated
    assert "still works" in body and "not released" not in body
    assert [e.kind for e in AuditEvent.select().where(AuditEvent.grant == grant)
            if e.kind.startswith("link_")] == ["link_undeliverable"]


def test_link_failure_notice_can_be_turned_off(runtime):
    rt = configured(runtime, notifications={"delivery_failure": False})
    grant = grant_of(shared(rt), SMITH)
    with rt.db.atomic():
        assert notify.link_failed(rt, grant.id, event="link_bounced", reason="x",
                                         detail={})
    assert Grant.get_by_id(grant.id).delivery == "failed"
    assert sent(rt, "notice") == []
