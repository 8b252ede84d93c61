"""Attacks on answering a request for access by e-mail, over real SMTP with DKIM: the requester
(or anyone) forging the sender's `approve`, an unsigned or misaligned one, a replay, a hidden
one. None gives anyone a grant or sends anything."""

from __future__ import annotations

import re
import smtplib

import pytest

from mailbridge.shares import access_requests
from mailbridge.store.models import AccessRequest, Grant
from tests.dkim_helpers import sign
from tests.e2e.test_commands import plain_reply, share_and_receipt
from tests.helpers import MEMBER, add_jane, wire
from tests.hostile.conftest import assert_nothing_happened, snapshot
from tests.hostile.test_replies import add_trailing_space, deliver, signed

SMITH = "dr.smith@ortho.example"
ASSISTANT = "ma.lopez@ortho.example"
OUR_FROM = "mailbridge@portal.example"


@pytest.fixture
def asked(svc):
    """A share, and an open request by ASSISTANT through SMITH's link; returns the service,
    the request and the request e-mail as the sender received it."""
    add_jane()
    share, _, _ = share_and_receipt(svc)
    grant = Grant.get(Grant.address == SMITH)
    row = access_requests.send_code(svc.runtime, grant, ASSISTANT, "", ip="198.51.100.7",
                                    user_agent="test")
    svc.drain()
    [code_mail] = [m for m in svc.sink.messages if m.rcpt_tos == [ASSISTANT]]
    code = re.search(r"\b(\d{6})\b", str(code_mail.message["Subject"])).group(1)
    access_requests.verify(svc.runtime, row.id, grant, code, ip="198.51.100.7",
                           user_agent="test")
    svc.drain()
    [request_mail] = [m for m in svc.sink.messages
                      if m.rcpt_tos == [MEMBER] and "asks for access" in m.raw.decode()]
    return svc, AccessRequest.get_by_id(row.id), request_mail


def approve_reply(request_mail, *, sender: str = MEMBER, text: str = "approve"):
    return plain_reply(text, to=OUR_FROM, sender=sender, receipt=request_mail)


def assert_still_open(request: AccessRequest) -> None:
    assert AccessRequest.get_by_id(request.id).state == "open"
    assert not Grant.select().where(Grant.address == ASSISTANT).exists()


def test_unsigned_approve_in_the_senders_name_does_nothing(asked):
    svc, request, request_mail = asked
    before = snapshot(svc)
    deliver(svc, wire(approve_reply(request_mail)), OUR_FROM)
    assert_nothing_happened(svc, before)
    assert_still_open(request)


def test_approve_signed_by_another_domain_does_nothing(asked):
    svc, request, request_mail = asked
    before = snapshot(svc)
    raw = sign(wire(approve_reply(request_mail)), "evil.example", "mb2024",
               svc.keyring.private_key)
    deliver(svc, raw, OUR_FROM)
    assert_nothing_happened(svc, before)
    assert_still_open(request)


def test_the_requester_approving_their_own_request_is_refused_at_the_door(asked):
    svc, request, request_mail = asked
    before = snapshot(svc)
    with pytest.raises(smtplib.SMTPException):
        deliver(svc, signed(svc, approve_reply(request_mail, sender=ASSISTANT)), OUR_FROM,
                sender=ASSISTANT)
    assert_nothing_happened(svc, before)
    assert_still_open(request)


def test_a_replayed_approve_acts_once(asked):
    svc, request, request_mail = asked
    original = signed(svc, approve_reply(request_mail))
    deliver(svc, original, OUR_FROM)
    svc.drain()
    assert AccessRequest.get_by_id(request.id).state == "approved"
    before = snapshot(svc)
    deliver(svc, add_trailing_space(original), OUR_FROM)
    assert_nothing_happened(svc, before)
    assert Grant.select().where(Grant.address == ASSISTANT).count() == 1


def test_approve_hidden_in_html_does_nothing(asked):
    svc, request, request_mail = asked
    msg = approve_reply(request_mail, text="")
    msg.set_content('<html><body><div style="display:none">approve</div>Thanks</body></html>',
                    subtype="html")
    before = snapshot(svc)
    deliver(svc, signed(svc, msg), OUR_FROM)
    after = snapshot(svc)
    assert after.grants == before.grants
    assert_still_open(request)
    assert [m.rcpt_tos for m in svc.sink.messages[before.relayed:]] == [[MEMBER]]
