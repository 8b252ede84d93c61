"""Reply commands through the pipeline: which share a reply is for, who may manage it, what each
command changes, and the one threaded answer (or notice) it earns."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import make_msgid

import pytest

from mailbridge.clock import ManualClock
from mailbridge.outbound import outbox
from mailbridge.receive import spool, worker
from mailbridge.shares.members import add_member
from mailbridge.store.models import AuditEvent, Grant, InboundMessage, OutboundMessage, Share
from tests.helpers import MEMBER, add_jane, share_message, wire

SMITH = "dr.smith@ortho.example"
JONES = "dr.jones@ortho.example"
COLLEAGUE = "sam.lee@clinic.example"
START = dt.datetime(2026, 11, 28, 14, 0)
SHARING = "share@portal.example"
OUR_FROM = "mailbridge@portal.example"


@pytest.fixture
def rt(runtime):
    """Authentication is the pipeline's job and tested elsewhere (and end to end); here the
    From address is taken as proven."""
    s = runtime.settings
    settings = dataclasses.replace(s, senders=dataclasses.replace(
        s.senders, require_authentication=False))
    return dataclasses.replace(runtime, settings=settings, clock=ManualClock(START))


@dataclasses.dataclass
class Shared:
    share: Share
    key: str
    receipt_id: str

    @property
    def reply_address(self) -> str:
        return f"reply+{self.key}@reply.portal.example"


def deliver(rt, msg: EmailMessage, to: list[str]) -> InboundMessage:
    row = spool.enqueue(rt, wire(msg), channel="smtp", envelope_from=sender_of(msg),
                        envelope_to=to)
    assert worker.run_once(rt, "node-a")
    return InboundMessage.get_by_id(row.id)


def sender_of(msg: EmailMessage) -> str:
    return msg["From"].addresses[0].addr_spec


def make_shared(rt, recipients=(SMITH, JONES), sender: str = MEMBER) -> Shared:
    if not Share.select().exists():
        add_jane()
    before = {r.id for r in OutboundMessage.select()}
    deliver(rt, share_message(sender=sender, recipients=recipients), [SHARING])
    share = Share.select().order_by(Share.id.desc()).get()
    [receipt] = [r for r in OutboundMessage.select().where(OutboundMessage.kind == "receipt")
                 if r.id not in before]
    key = re.search(r"reply\+([0-9a-f]{40})@", opened(rt, receipt)["Reply-To"]).group(1)
    OutboundMessage.update(state="sent").execute()  # the dispatcher's part; keeps `sent()` clear
    return Shared(share, key, receipt.message_id)


def reply(text: str, *, sender: str = MEMBER, to: str = "", in_reply_to: str | None = None,
          subject: str = "Re: Shared: POC for patient R.T.") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Staff <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="clinic.example")
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    msg.set_content(text)
    return msg


def send_reply(rt, shared: Shared, text: str, **kwargs) -> tuple[InboundMessage, EmailMessage]:
    msg = reply(text, to=shared.reply_address, **kwargs)
    return deliver(rt, msg, [shared.reply_address]), msg


def opened(rt, row: OutboundMessage) -> EmailMessage:
    return BytesParser(policy=policy.default).parsebytes(outbox.open_message(rt, row))


def sent(rt, kind: str | None = None) -> list[tuple[OutboundMessage, EmailMessage]]:
    """What is waiting to go out since the test's share was made."""
    query = OutboundMessage.select().where(OutboundMessage.state == "queued")
    if kind:
        query = query.where(OutboundMessage.kind == kind)
    return [(row, opened(rt, row)) for row in query.order_by(OutboundMessage.id)]


def text_of(msg: EmailMessage) -> str:
    return " ".join(msg.get_body(("plain",)).get_content().split())


def states(shared: Shared) -> dict[str, str]:
    return {g.address: g.state for g in Grant.select().where(Grant.share == shared.share)}


def audit_kinds() -> list[str]:
    return [e.kind for e in AuditEvent.select().order_by(AuditEvent.id)]


def the_answer(rt, msg: EmailMessage, shared: Shared) -> EmailMessage:
    [(row, answer)] = sent(rt, "reply")
    assert row.to_addr == MEMBER and row.share_id == shared.share.id
    assert answer["In-Reply-To"] == msg["Message-ID"] == answer["References"]
    assert answer["Reply-To"] == shared.reply_address
    assert answer["Auto-Submitted"] == "auto-replied"
    assert answer["Subject"] == msg["Subject"]  # "Re: ..." kept, so clients thread it
    return answer


# --- the commands ------------------------------------------------------------------------------


def test_status_is_answered_with_the_report(rt):
    shared = make_shared(rt)
    row, msg = send_reply(rt, shared, "Status\n\nThanks")
    answer = the_answer(rt, msg, shared)
    text = text_of(answer)
    assert f"{SMITH}: pending" in text and "opened in a browser: not yet" in text
    assert "America/New_York" in text and "revoke <address>" in text
    event = AuditEvent.get(AuditEvent.kind == "status_sent")
    assert event.actor == MEMBER and event.share_id == shared.share.id
    assert (row.state, row.outcome) == ("done", "command")
    assert set(states(shared).values()) == {"pending"}


def test_revoke_is_done_confirmed_and_idempotent(rt):
    shared = make_shared(rt)
    _, msg = send_reply(rt, shared, "revoke")
    assert set(states(shared).values()) == {"revoked"}
    assert "Access withdrawn from 2 recipients" in text_of(the_answer(rt, msg, shared))
    assert sorted(row.to_addr for row, _ in sent(rt, "revoked")) == [JONES, SMITH]
    assert "share_revoked" in audit_kinds()
    OutboundMessage.update(state="sent").execute()
    _, again = send_reply(rt, shared, "REVOKE")
    assert "Already revoked" in text_of(the_answer(rt, again, shared))
    assert sent(rt, "revoked") == []


def test_revoke_one_address_and_an_address_not_on_the_share(rt):
    shared = make_shared(rt)
    _, msg = send_reply(rt, shared, "revoke dr.jones@ortho.example")
    assert states(shared) == {SMITH: "pending", JONES: "revoked"}
    assert f"Access withdrawn from {JONES}" in text_of(the_answer(rt, msg, shared))
    OutboundMessage.update(state="sent").execute()
    _, msg = send_reply(rt, shared, "revoke dr.who@tardis.example")
    assert "dr.who@tardis.example is not a recipient of this share; nothing was changed" in \
        text_of(the_answer(rt, msg, shared))
    assert states(shared) == {SMITH: "pending", JONES: "revoked"}


def test_resend_after_the_links_lapsed(rt):
    shared = make_shared(rt)
    rt.clock.advance(hours=rt.settings.shares.claim_hours + 1)
    _, msg = send_reply(rt, shared, "resend")
    assert "New links sent to 2 recipients" in text_of(the_answer(rt, msg, shared))
    assert sorted(row.to_addr for row, _ in sent(rt, "link")) == [JONES, SMITH]
    assert {g.deadline for g in shared.share.grants} == {
        rt.clock() + dt.timedelta(hours=rt.settings.shares.claim_hours)}
    OutboundMessage.update(state="sent").execute()
    _, msg = send_reply(rt, shared, "resend dr.smith@ortho.example")
    assert [row.to_addr for row, _ in sent(rt, "link")] == [SMITH]


def test_extend_with_and_without_hours(rt):
    shared = make_shared(rt, recipients=(SMITH,))
    deadline = Grant.get().deadline
    _, msg = send_reply(rt, shared, "extend 48")
    assert "1 unclaimed link extended by 48 hours" in text_of(the_answer(rt, msg, shared))
    assert Grant.get().deadline == deadline + dt.timedelta(hours=48)
    OutboundMessage.update(state="sent").execute()
    send_reply(rt, shared, "extend")
    assert Grant.get().deadline == deadline + dt.timedelta(
        hours=48 + rt.settings.shares.claim_hours)
    OutboundMessage.update(state="sent").execute()
    _, msg = send_reply(rt, shared, "extend a fortnight")
    assert "is not a number of hours above 0; nothing was changed" in text_of(
        the_answer(rt, msg, shared))


@pytest.mark.parametrize("text, recognised", [
    ("help", True), ("please cancel this", False), ("", False),
    ("Thanks!\n\nOn Sat, 28 Nov 2026 Jane wrote:\n> revoke", False),
    ("> revoke\n", False)])
def test_help_and_anything_unrecognised_get_the_command_list(rt, text, recognised):
    shared = make_shared(rt)
    _, msg = send_reply(rt, shared, text)
    answer = text_of(the_answer(rt, msg, shared))
    assert "revoke <address>" in answer and "extend [hours]" in answer
    assert ("not a command" in answer) is not recognised
    assert set(states(shared).values()) == {"pending"}
    assert "help_sent" in audit_kinds() and "grant_revoked" not in audit_kinds()


def test_the_same_reply_delivered_twice_is_answered_once(rt):
    shared = make_shared(rt)
    rt.clock.advance(hours=30)
    msg = reply("resend", to=shared.reply_address)
    deliver(rt, msg, [shared.reply_address])
    tokens_after_first = {g.token_hash for g in shared.share.grants}
    second = deliver(rt, msg, [shared.reply_address])  # the member's MTA retried
    assert second.outcome == "repeat"
    assert {g.token_hash for g in shared.share.grants} == tokens_after_first
    assert len(sent(rt, "reply")) == 1 and len(sent(rt, "link")) == 2


# --- who may manage a share ------------------------------------------------------------------


def refused_with(rt, code: str, sender: str) -> None:
    [(row, notice)] = sent(rt)
    assert row.kind == "notice" and row.to_addr == sender and row.share_id is None
    assert notice["Auto-Submitted"] == "auto-replied"
    event = AuditEvent.get(AuditEvent.kind == "reply_refused")
    assert event.detail == {"reason": code} and event.actor == sender
    assert InboundMessage.select().order_by(InboundMessage.id.desc()).get().state == "rejected"


def test_another_member_is_told_no_and_nothing_changes(rt):
    shared = make_shared(rt)
    add_member(COLLEAGUE, "Sam Lee", "Riverside PT", START)
    _, msg = send_reply(rt, shared, "revoke", sender=COLLEAGUE)
    assert set(states(shared).values()) == {"pending"}
    refused_with(rt, "reply_not_allowed", COLLEAGUE)
    [(_, notice)] = sent(rt)
    assert notice["In-Reply-To"] == msg["Message-ID"]
    assert "Only the person who shared these documents can manage" in text_of(notice)


@pytest.mark.parametrize("allowed", [False, True])
def test_clinic_admin_may_manage_only_when_configured(rt, allowed):
    rt = dataclasses.replace(rt, settings=dataclasses.replace(
        rt.settings, shares=dataclasses.replace(rt.settings.shares,
                                                allow_clinic_admins=allowed)))
    shared = make_shared(rt)
    add_member("boss@clinic.example", "Pat Boss", "Riverside PT", START, admin=True)
    send_reply(rt, shared, "revoke", sender="boss@clinic.example")
    if allowed:
        assert set(states(shared).values()) == {"revoked"}
        [(row, _)] = sent(rt, "reply")
        assert row.to_addr == "boss@clinic.example"
        assert AuditEvent.get(AuditEvent.kind == "share_revoked").actor == "boss@clinic.example"
    else:
        assert set(states(shared).values()) == {"pending"}
        refused_with(rt, "reply_not_allowed", "boss@clinic.example")


def test_admin_of_another_clinic_is_refused_even_when_admins_may_manage(rt):
    rt = dataclasses.replace(rt, settings=dataclasses.replace(
        rt.settings, shares=dataclasses.replace(rt.settings.shares, allow_clinic_admins=True)))
    shared = make_shared(rt)
    add_member("boss@other.example", "Other Boss", "Lakeside Ortho", START, admin=True)
    send_reply(rt, shared, "revoke", sender="boss@other.example")
    assert set(states(shared).values()) == {"pending"}
    refused_with(rt, "reply_not_allowed", "boss@other.example")


def test_a_member_replying_with_another_members_key_is_refused(rt):
    theirs = make_shared(rt)
    add_member(COLLEAGUE, "Sam Lee", "Lakeside Ortho", START)
    mine = make_shared(rt, sender=COLLEAGUE)
    send_reply(rt, theirs, "revoke", sender=COLLEAGUE)
    assert set(states(theirs).values()) == {"pending"}
    assert set(states(mine).values()) == {"pending"}
    refused_with(rt, "reply_not_allowed", COLLEAGUE)


def test_unknown_reply_key_gets_reply_unknown(rt):
    make_shared(rt)
    address = "reply+" + "0" * 40 + "@reply.portal.example"
    deliver(rt, reply("revoke", to=address), [address])
    refused_with(rt, "reply_unknown", MEMBER)
    assert "did not match any share" in text_of(sent(rt)[0][1])
    assert {g.state for g in Grant.select()} == {"pending"}


# --- replies without a reply+key address -----------------------------------------------------


def test_reply_to_the_sharing_address_that_answers_a_receipt_is_a_command(rt):
    shared = make_shared(rt)
    msg = reply("revoke", to=SHARING, in_reply_to=shared.receipt_id)
    row = deliver(rt, msg, [SHARING])
    assert row.outcome == "command" and set(states(shared).values()) == {"revoked"}
    [(_, answer)] = sent(rt, "reply")
    assert answer["Reply-To"] is None  # the key is unknown here; replies thread by Message-ID
    # ...and a reply to that answer (it goes to our From address) is matched again.
    OutboundMessage.update(state="sent").execute()
    follow_up = reply("status", to=OUR_FROM, in_reply_to=answer["Message-ID"])
    assert deliver(rt, follow_up, [OUR_FROM]).outcome == "command"
    assert "status_sent" in audit_kinds()


def test_mail_to_the_sharing_address_without_our_reference_is_a_new_share(rt):
    shared = make_shared(rt)
    msg = share_message(recipients=["new@doc.example"])
    msg["In-Reply-To"] = "<someone-else@clinic.example>"
    deliver(rt, msg, [SHARING])
    assert Share.select().count() == 2
    assert set(states(shared).values()) == {"pending"}


def test_a_reference_to_a_recipients_link_email_does_not_name_the_share(rt):
    shared = make_shared(rt)
    link = OutboundMessage.get(OutboundMessage.kind == "link")
    deliver(rt, reply("revoke", to=OUR_FROM, in_reply_to=link.message_id), [OUR_FROM])
    refused_with(rt, "reply_unknown", MEMBER)
    assert set(states(shared).values()) == {"pending"}
