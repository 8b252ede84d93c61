"""The sender answers a request for access by reply, through the pipeline: `approve` gives the
requester a grant of their own (audited with the forwarded link's grant as its origin), `deny`
tells them without PHI; each request is answered once, and nothing else (quoted text, another
member, a lapsed request) answers it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re

import pytest

from mailbridge.clock import ManualClock
from mailbridge.outbound import outbox
from mailbridge.shares import access_requests
from mailbridge.shares.members import add_member
from mailbridge.store.models import AccessRequest, AuditEvent, Grant, OutboundMessage
from tests.helpers import MEMBER
from tests.shares.test_reply import (
    OUR_FROM,
    SMITH,
    START,
    deliver,
    make_shared,
    opened,
    reply,
    send_reply,
    sent,
    text_of,
)

ASSISTANT = "ma.lopez@ortho.example"
NURSE = "rn.kim@ortho.example"
TITLE = "POC for patient R.T."


@pytest.fixture
def rt(runtime):
    s = runtime.settings
    settings = dataclasses.replace(s, senders=dataclasses.replace(
        s.senders, require_authentication=False))
    return dataclasses.replace(runtime, settings=settings, clock=ManualClock(START))


def open_request(rt, shared, address: str = ASSISTANT) -> tuple[AccessRequest, str]:
    """A proven request through SMITH's link, as the portal makes it; returns the request and
    the Message-ID of the e-mail that asked the sender."""
    grant = Grant.get((Grant.share == shared.share) & (Grant.address == SMITH))
    row = access_requests.send_code(rt, grant, address, "Maria Lopez", ip="192.0.2.9",
                                    user_agent="test")
    code_row = (OutboundMessage.select().where(OutboundMessage.kind == "access_code")
                .order_by(OutboundMessage.id.desc()).first())
    code = re.search(r"\b(\d{6})\b", text_of(opened(rt, code_row))).group(1)
    done = access_requests.verify(rt, row.id, grant, code, ip="192.0.2.9", user_agent="test")
    assert isinstance(done, access_requests.Submitted) and not done.already
    OutboundMessage.update(state="sent").execute()
    request = AccessRequest.get_by_id(row.id)
    return request, request.notice_message_id


def answer_to_request(rt, text: str, message_id: str, sender: str = MEMBER):
    """The member replies to the request e-mail (its Reply-To is our From address)."""
    msg = reply(text, to=OUR_FROM, in_reply_to=message_id, sender=sender)
    return deliver(rt, msg, [OUR_FROM]), msg


def grants_for(address: str) -> list[Grant]:
    return list(Grant.select().where(Grant.address == address))


def test_approve_gives_the_requester_a_link_of_their_own(rt):
    shared = make_shared(rt, recipients=(SMITH,))
    request, asked = open_request(rt, shared)
    rt.clock.advance(hours=2)
    row, msg = answer_to_request(rt, "Approve\n\nThanks", asked)
    assert row.outcome == "command"

    [grant] = grants_for(ASSISTANT)
    assert grant.share_id == shared.share.id and grant.state == "pending"
    assert grant.deadline == rt.clock() + dt.timedelta(hours=24)  # its own claim window
    original = Grant.get(Grant.address == SMITH)
    assert original.state == "pending"  # the forwarded link is left as it was
    [(link_row, link)] = sent(rt, "link")
    assert link_row.to_addr == ASSISTANT and link_row.grant_id == grant.id
    raw = outbox.open_message(rt, link_row).decode()
    assert TITLE not in raw and "plan-of-care" not in raw and "Please review" not in raw
    assert "/s/" in text_of(link)
    [(_, answer)] = sent(rt, "reply")
    assert answer["In-Reply-To"] == msg["Message-ID"]
    assert f"Access given to {ASSISTANT}" in text_of(answer)

    request = AccessRequest.get_by_id(request.id)
    assert request.state == "approved" and request.grant_id == grant.id
    assert request.decided_by == MEMBER
    created = AuditEvent.get((AuditEvent.kind == "grant_created")
                             & (AuditEvent.grant == grant))
    assert created.detail == {"origin_grant": original.id, "access_request": request.id}
    approved = AuditEvent.get(AuditEvent.kind == "access_approved")
    assert approved.actor == MEMBER and approved.detail["origin_grant"] == original.id
    assert approved.detail["via"] == "reply"


def test_deny_tells_the_requester_without_phi(rt):
    shared = make_shared(rt, recipients=(SMITH,))
    request, asked = open_request(rt, shared)
    answer_to_request(rt, "deny", asked)
    assert not grants_for(ASSISTANT)
    [(row, told)] = sent(rt, "access_refused")
    raw = outbox.open_message(rt, row).decode()
    assert row.to_addr == ASSISTANT and "not granted" in str(told["Subject"])
    for secret in (TITLE, "plan-of-care", "Please review", SMITH):
        assert secret not in raw
    assert AccessRequest.get_by_id(request.id).state == "denied"
    [(_, answer)] = sent(rt, "reply")
    assert "Access refused" in text_of(answer)
    assert AuditEvent.get(AuditEvent.kind == "access_refused").detail["address"] == ASSISTANT


def test_a_request_is_answered_once(rt):
    shared = make_shared(rt, recipients=(SMITH,))
    request, asked = open_request(rt, shared)
    answer_to_request(rt, "approve", asked)
    OutboundMessage.update(state="sent").execute()
    for second in ("approve", "deny"):
        answer_to_request(rt, second, asked)  # a new message: acted on, changes nothing
        [(_, answer)] = sent(rt, "reply")
        assert "already approved" in text_of(answer)
        assert not sent(rt, "link") and not sent(rt, "access_refused")
        OutboundMessage.update(state="sent").execute()
    assert len(grants_for(ASSISTANT)) == 1
    assert AccessRequest.get_by_id(request.id).state == "approved"


def test_the_same_approve_delivered_twice_acts_once(rt):
    shared = make_shared(rt, recipients=(SMITH,))
    _, asked = open_request(rt, shared)
    msg = reply("approve", to=OUR_FROM, in_reply_to=asked)
    deliver(rt, msg, [OUR_FROM])
    again = deliver(rt, msg, [OUR_FROM])  # an SMTP retry: same Message-ID
    assert again.outcome == "repeat"
    assert len(grants_for(ASSISTANT)) == 1 and len(sent(rt, "link")) == 1


def test_approve_only_in_quoted_text_changes_nothing(rt):
    shared = make_shared(rt, recipients=(SMITH,))
    request, asked = open_request(rt, shared)
    quoted = ("On Sat, Nov 28, 2026 at 9:00 AM mailbridge <mailbridge@portal.example> wrote:\n"
              "> approve\n> deny\n")
    answer_to_request(rt, quoted, asked)
    assert not grants_for(ASSISTANT) and not sent(rt, "access_refused")
    assert AccessRequest.get_by_id(request.id).state == "open"
    [(_, answer)] = sent(rt, "reply")
    assert "not a command" in text_of(answer)


def test_another_member_cannot_answer(rt):
    shared = make_shared(rt, recipients=(SMITH,))
    add_member("sam.lee@clinic.example", "Sam Lee", "Riverside PT", rt.clock())
    request, asked = open_request(rt, shared)
    row, _ = answer_to_request(rt, "approve", asked, sender="sam.lee@clinic.example")
    assert row.state == "rejected" and row.outcome == "reply_not_allowed"
    assert not grants_for(ASSISTANT) and AccessRequest.get_by_id(request.id).state == "open"
    assert not sent(rt, "link")


def test_a_lapsed_request_cannot_be_approved(rt):
    shared = make_shared(rt, recipients=(SMITH,))
    request, asked = open_request(rt, shared)
    rt.clock.advance(hours=72, seconds=1)
    answer_to_request(rt, "approve", asked)
    assert not grants_for(ASSISTANT) and not sent(rt, "link")
    [(_, answer)] = sent(rt, "reply")
    assert "lapsed unanswered" in text_of(answer)


def test_approve_by_address_on_the_receipt_and_an_ambiguous_bare_approve(rt):
    shared = make_shared(rt, recipients=(SMITH,))
    open_request(rt, shared, ASSISTANT)
    rt.clock.advance(minutes=20)
    open_request(rt, shared, NURSE)
    send_reply(rt, shared, "approve", in_reply_to=shared.receipt_id)  # which one?
    [(_, answer)] = sent(rt, "reply")
    assert "Several people asked" in text_of(answer) and NURSE in text_of(answer)
    assert not sent(rt, "link")
    OutboundMessage.update(state="sent").execute()
    send_reply(rt, shared, f"approve {NURSE}", in_reply_to=shared.receipt_id)
    assert len(grants_for(NURSE)) == 1 and not grants_for(ASSISTANT)
    OutboundMessage.update(state="sent").execute()
    send_reply(rt, shared, "deny someone@else.example")
    [(_, answer)] = sent(rt, "reply")
    assert "has not asked for access" in text_of(answer)


def test_approve_with_no_request_waiting_says_so(rt):
    shared = make_shared(rt, recipients=(SMITH,))
    send_reply(rt, shared, "approve")
    [(_, answer)] = sent(rt, "reply")
    assert "Nobody is waiting" in text_of(answer) and not sent(rt, "link")
