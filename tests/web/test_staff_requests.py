"""The staff console's Requests page: the member's (an admin: the clinic's) requests for access,
Approve and Deny through a confirmation page — the same answer as by reply; other members and
other clinics get a 404."""

from __future__ import annotations

import re
import secrets

import pytest

from mailbridge.shares import access_requests
from mailbridge.shares.members import add_member
from mailbridge.store import tokens
from mailbridge.store.models import (
    AccessRequest,
    AuditEvent,
    Grant,
    Member,
    OutboundMessage,
    WebSession,
)
from tests.portal_helpers import form_token, make_app, make_share, portal_runtime
from tests.web.test_link_requests import body, mails

OWNER = "dr.smith@ortho.example"
ASSISTANT = "ma.lopez@ortho.example"


@pytest.fixture
def desk(runtime):
    rt = portal_runtime(runtime)
    share, links = make_share(rt, recipients=(OWNER,))
    grant = Grant.get(Grant.address == OWNER)
    row = access_requests.send_code(rt, grant, ASSISTANT, "Maria Lopez", ip="", user_agent="")
    code = re.search(r"\b(\d{6})\b", body(mails(rt, "access_code")[-1][1])).group(1)
    assert isinstance(access_requests.verify(rt, row.id, grant, code, ip="", user_agent=""),
                      access_requests.Submitted)
    return rt, make_app(rt), share, AccessRequest.get_by_id(row.id)


def console_for(app, rt, member: Member):
    sid = secrets.token_urlsafe(32)
    now = rt.clock()
    WebSession.create(id_hash=tokens.hash_token(sid), member=member, data={}, created_at=now,
                      last_seen_at=now)
    client = app.test_client()
    client.set_cookie("mb_session", sid)
    return client


def decide(client, request_id: int, decision: str):
    page = client.get(f"/staff/requests/{request_id}/confirm?decision={decision}")
    assert page.status_code == 200
    assert AccessRequest.get_by_id(request_id).state == "open"  # showing it decides nothing
    return client.post(f"/staff/requests/{request_id}/decide",
                       data={"csrf_token": form_token(page.get_data(as_text=True)),
                             "decision": decision})


def test_the_sender_sees_the_request_and_approves_it(desk):
    rt, app, share, request = desk
    client = console_for(app, rt, share.sender)
    page = client.get("/staff/requests").get_data(as_text=True)
    assert ASSISTANT in page and "Maria Lopez" in page and f"the one sent to {OWNER}" in page
    assert "POC for R.T." in page and 'href="/staff/requests"' in page
    assert not Grant.select().where(Grant.address == ASSISTANT).exists()  # GETs change nothing
    done = decide(client, request.id, "approve")
    assert done.status_code == 302
    [grant] = Grant.select().where(Grant.address == ASSISTANT)
    assert grant.state == "pending" and AccessRequest.get_by_id(request.id).grant_id == grant.id
    assert [row.to_addr for row, _ in mails(rt, "link")] == [ASSISTANT]
    assert AuditEvent.get(AuditEvent.kind == "access_approved").detail["via"] == "console"
    after = client.get("/staff/requests").get_data(as_text=True)
    assert f"Access given to {ASSISTANT}" in after and "No request is waiting" in after
    assert not mails(rt, "notice")  # the sender acted: nobody to tell


def test_deny_in_the_console(desk):
    rt, app, share, request = desk
    assert decide(console_for(app, rt, share.sender), request.id, "deny").status_code == 302
    assert AccessRequest.get_by_id(request.id).state == "denied"
    assert [row.to_addr for row, _ in mails(rt, "access_refused")] == [ASSISTANT]


def test_an_admin_answers_a_colleagues_request_and_the_sender_is_told(desk):
    rt, app, share, request = desk
    admin = add_member("boss@clinic.example", "Pat Boss", "Riverside PT", rt.clock(),
                       admin=True)
    decide(console_for(app, rt, admin), request.id, "approve")
    assert AccessRequest.get_by_id(request.id).decided_by == "boss@clinic.example"
    [(row, notice)] = mails(rt, "notice")
    assert row.to_addr == share.sender.email and "Pat Boss" in body(notice)


@pytest.mark.parametrize("who", ["colleague", "other clinic admin"])
def test_other_members_get_not_found(desk, who):
    rt, app, share, request = desk
    if who == "colleague":
        other = add_member("sam.lee@clinic.example", "Sam Lee", "Riverside PT", rt.clock())
    else:
        other = add_member("admin@other.example", "Other Admin", "Other Clinic", rt.clock(),
                           admin=True)
    client = console_for(app, rt, other)
    assert ASSISTANT not in client.get("/staff/requests").get_data(as_text=True)
    assert client.get(f"/staff/requests/{request.id}/confirm?decision=approve").status_code \
        == 404
    token = form_token(client.get("/staff/requests").get_data(as_text=True))
    refused = client.post(f"/staff/requests/{request.id}/decide",
                          data={"csrf_token": token, "decision": "approve"})
    assert refused.status_code == 404
    assert AccessRequest.get_by_id(request.id).state == "open"


def test_without_sign_in_or_csrf_nothing_happens(desk):
    rt, app, share, request = desk
    anonymous = app.test_client()
    assert "/staff" in anonymous.get("/staff/requests").headers["Location"]
    client = console_for(app, rt, share.sender)
    before = OutboundMessage.select().count()
    refused = client.post(f"/staff/requests/{request.id}/decide", data={"decision": "approve"})
    assert refused.status_code == 400
    assert AccessRequest.get_by_id(request.id).state == "open"
    assert OutboundMessage.select().count() == before
