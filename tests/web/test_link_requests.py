""""Request access for my own address" on a forwarded link: the form only shows; a code proves
the requester's address (the claim code's rules); then the sender is e-mailed. Requesters see
and receive nothing of the share; every refusal changes nothing."""

from __future__ import annotations

import email
import email.policy
import re
from types import SimpleNamespace

import pytest

from mailbridge.outbound import outbox
from mailbridge.store.models import AccessRequest, AuditEvent, Grant, OutboundMessage
from tests.portal_helpers import (
    csrf,
    form_token,
    make_account,
    make_app,
    make_share,
    portal_runtime,
    sign_in,
)

OWNER = "dr.smith@ortho.example"
ASSISTANT = "ma.lopez@ortho.example"
TITLE = "POC for R.T."
FILENAME = "plan-of-care.pdf"
NOTE = "Please review."


@pytest.fixture
def fwd(runtime):
    rt = portal_runtime(runtime)
    share, links = make_share(rt, recipients=(OWNER,), title=TITLE,
                              note_html=f"<p>{NOTE}</p>")
    token = links[OWNER]
    return SimpleNamespace(runtime=rt, clock=rt.clock, share=share, token=token,
                           grant=Grant.get(Grant.address == OWNER),
                           client=make_app(rt).test_client(), path=f"/s/{token}/request")


def mails(rt, kind: str) -> list:
    rows = (OutboundMessage.select().where(OutboundMessage.kind == kind)
            .order_by(OutboundMessage.id))
    return [(row, email.message_from_bytes(outbox.open_message(rt, row),
                                           policy=email.policy.default)) for row in rows]


def body(msg) -> str:
    return msg.get_body(("plain",)).get_content()


def ask(f, address: str = ASSISTANT, name: str = "Maria Lopez, MA", client=None):
    client = client or f.client
    return client.post(f.path, data={"csrf_token": csrf(client, f.path), "email": address,
                                     "name": name})


def last_code(f) -> str:
    _, msg = mails(f.runtime, "access_code")[-1]
    return re.search(r"\b(\d{6})\b", body(msg)).group(1)


def confirm(f, code: str, client=None):
    client = client or f.client
    return client.post(f"{f.path}/code", data={"csrf_token": csrf(client, f.path), "code": code})


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


def test_forwardee_proves_own_address_and_the_sender_is_asked(fwd):
    f = fwd
    link = f.client.get(f"/s/{f.token}").get_data(as_text=True)
    assert f'href="{f.path}"' in link and "Request access for my own address" in link

    page = f.client.get(f.path)
    text = page.get_data(as_text=True)
    assert page.status_code == 200 and 'name="email"' in text and 'name="csrf_token"' in text
    for secret in (TITLE, FILENAME, NOTE, OWNER):
        assert secret not in text

    sent = ask(f)
    assert sent.status_code == 302 and sent.headers["Location"].endswith(f.path)
    [(row, code_mail)] = mails(f.runtime, "access_code")
    assert row.to_addr == ASSISTANT and row.share_id is None and row.grant_id is None
    raw = outbox.open_message(f.runtime, row).decode()
    for secret in (TITLE, FILENAME, NOTE, OWNER):
        assert secret not in raw
    stored = AccessRequest.get()
    assert stored.state == "unverified" and last_code(f) not in stored.code_hash
    assert 'name="code"' in f.client.get(f.path).get_data(as_text=True)

    assert confirm(f, wrong(last_code(f))).status_code == 400
    done = confirm(f, last_code(f))
    assert done.status_code == 200 and "Your request was sent" in done.get_data(as_text=True)
    stored = AccessRequest.get()
    assert stored.state == "open" and stored.requested_at == f.clock()
    assert (stored.expires_at - stored.requested_at).total_seconds() == 72 * 3600

    [(row, request_mail)] = mails(f.runtime, "access_request")
    text = " ".join(body(request_mail).split())
    assert row.to_addr == "jane.doe@clinic.example" and row.share_id == f.share.id
    assert str(request_mail["Subject"]) == f"Re: Shared: {TITLE}"  # under the receipt
    assert f"{ASSISTANT} asks for access" in text
    assert f"Link used: the one sent to {OWNER}" in text
    assert "Maria Lopez, MA" in text and TITLE in text and "approve" in text
    assert stored.notice_message_id == request_mail["Message-ID"]
    kinds = [e.kind for e in AuditEvent.select().order_by(AuditEvent.seq)]
    assert kinds.count("access_code_sent") == 1 and "access_code_failed" in kinds
    event = AuditEvent.get(AuditEvent.kind == "access_requested")
    assert event.grant_id == f.grant.id and event.actor == ASSISTANT
    assert event.detail["origin_grant"] == f.grant.id
    # Nothing changed for the original recipient.
    assert Grant.get_by_id(f.grant.id).state == "pending" and Grant.select().count() == 1


def test_showing_the_form_changes_nothing(fwd):
    for _ in range(10):
        assert fwd.client.get(fwd.path).status_code == 200
        assert fwd.client.head(fwd.path).status_code == 200
    assert not AccessRequest.select().exists() and not OutboundMessage.select().exists()


def test_a_post_without_csrf_token_sends_nothing(fwd):
    answer = fwd.client.post(fwd.path, data={"email": ASSISTANT})
    assert answer.status_code == 400
    assert not AccessRequest.select().exists() and not OutboundMessage.select().exists()


@pytest.mark.parametrize("address", ["not an address", OWNER, OWNER.upper(), ""])
def test_a_bad_or_the_links_own_address_gets_no_code(fwd, address):
    answer = ask(fwd, address)
    assert answer.status_code == 400
    assert not AccessRequest.select().exists() and not OutboundMessage.select().exists()


def test_the_code_expires_after_ten_minutes(fwd):
    ask(fwd)
    fwd.clock.advance(minutes=10, seconds=1)
    code = last_code(fwd)
    assert confirm(fwd, code).status_code in (302, 400)
    assert AccessRequest.get().state == "unverified"
    assert not mails(fwd.runtime, "access_request")


def test_five_wrong_tries_kill_the_code(fwd):
    ask(fwd)
    code = last_code(fwd)
    answers = [confirm(fwd, wrong(code)).status_code for _ in range(5)]
    assert answers == [400] * 5
    assert "can no longer be used" in confirm(fwd, code).get_data(as_text=True)
    assert AccessRequest.get().state == "unverified"


def test_a_code_works_once_and_a_second_confirm_asks_nobody_again(fwd):
    ask(fwd)
    code = last_code(fwd)
    token = form_token(fwd.client.get(fwd.path).get_data(as_text=True))
    assert confirm(fwd, code).status_code == 200
    again = fwd.client.post(f"{fwd.path}/code", data={"csrf_token": token, "code": code})
    assert again.status_code == 302  # nothing waiting in this browser any more
    assert len(mails(fwd.runtime, "access_request")) == 1


def test_a_new_code_makes_the_old_one_useless(fwd):
    ask(fwd)
    old = last_code(fwd)
    ask(fwd)
    new = last_code(fwd)
    if old != new:
        assert confirm(fwd, old).status_code == 400
    assert confirm(fwd, new).status_code == 200


def test_at_most_three_codes_per_link_in_fifteen_minutes(fwd):
    answers = [ask(fwd, f"person{n}@elsewhere.example").status_code for n in range(4)]
    assert answers == [302, 302, 302, 429]
    assert len(mails(fwd.runtime, "access_code")) == 3
    fwd.clock.advance(minutes=16)
    assert ask(fwd, "person9@elsewhere.example").status_code == 302


def test_at_most_three_codes_per_address_across_links(fwd):
    _, links = make_share(fwd.runtime, recipients=("dr.jones@ortho.example",))
    other = f"/s/{links['dr.jones@ortho.example']}/request"
    for path in (fwd.path, fwd.path, other):
        fwd.client.post(path, data={"csrf_token": csrf(fwd.client, path), "email": ASSISTANT})
    refused = fwd.client.post(other, data={"csrf_token": csrf(fwd.client, other),
                                           "email": ASSISTANT})
    assert refused.status_code == 429 and len(mails(fwd.runtime, "access_code")) == 3


def test_requests_are_rate_limited_per_ip(fwd):
    answers = [ask(fwd, f"p{n}@elsewhere.example").status_code for n in range(6)]
    assert answers[-1] == 429


def test_asking_twice_or_having_access_already_does_not_ask_the_sender_again(fwd):
    ask(fwd)
    confirm(fwd, last_code(fwd))
    fwd.clock.advance(minutes=20)
    ask(fwd)
    page = confirm(fwd, last_code(fwd)).get_data(as_text=True)
    assert "You asked already" in page
    _, links = make_share(fwd.runtime, recipients=(OWNER, "dr.jones@ortho.example"))
    share = Grant.get(Grant.address == "dr.jones@ortho.example").share
    path = f"/s/{links[OWNER]}/request"
    fwd.clock.advance(minutes=20)
    fwd.client.post(path, data={"csrf_token": csrf(fwd.client, path),
                                "email": "dr.jones@ortho.example"})
    done = fwd.client.post(f"{path}/code", data={"csrf_token": csrf(fwd.client, path),
                                                 "code": last_code(fwd)})
    assert "already has access" in done.get_data(as_text=True)
    assert [r.share_id for r, _ in mails(fwd.runtime, "access_request")] == [fwd.share.id]
    assert share.id != fwd.share.id


@pytest.mark.parametrize("state", ["revoked", "expired"])
def test_a_dead_link_offers_no_request(fwd, state):
    if state == "expired":
        fwd.clock.advance(hours=25)
    else:
        Grant.update(state="revoked").where(Grant.id == fwd.grant.id).execute()
    page = fwd.client.get(fwd.path).get_data(as_text=True)
    assert 'name="email"' not in page and "Request access" not in page
    token = form_token(fwd.client.get("/signin").get_data(as_text=True))
    fwd.client.post(fwd.path, data={"csrf_token": token, "email": ASSISTANT})
    assert not AccessRequest.select().exists()


def test_a_claimed_link_still_offers_a_request(fwd):
    Grant.update(state="claimed").where(Grant.id == fwd.grant.id).execute()
    page = fwd.client.get(f"/s/{fwd.token}").get_data(as_text=True)
    assert "already been claimed" in page and "Request access for my own address" in page
    assert ask(fwd).status_code == 302


def test_signed_in_as_someone_else_the_refusal_offers_the_request(fwd):
    make_account(fwd.runtime, ASSISTANT)
    sign_in(fwd.client, ASSISTANT)
    refused = fwd.client.get(f"/s/{fwd.token}/next")
    text = refused.get_data(as_text=True)
    assert refused.status_code == 403 and f'href="{fwd.path}"' in text
    form = fwd.client.get(fwd.path).get_data(as_text=True)
    assert f'value="{ASSISTANT}"' in form  # their address, still to be proven by a code
    assert ask(fwd).status_code == 302 and confirm(fwd, last_code(fwd)).status_code == 200


def test_the_addressee_signed_in_is_sent_back_to_the_link(fwd):
    make_account(fwd.runtime, OWNER)
    sign_in(fwd.client, OWNER)
    answer = fwd.client.get(fwd.path)
    assert answer.status_code == 302 and answer.headers["Location"].endswith(f"/s/{fwd.token}")


def test_unknown_tokens_get_the_same_not_found(fwd):
    token = form_token(fwd.client.get(fwd.path).get_data(as_text=True))
    pages = [fwd.client.get("/s/" + "A" * 43 + "/request"),
             fwd.client.post("/s/" + "A" * 43 + "/request",
                             data={"csrf_token": token, "email": ASSISTANT}),
             fwd.client.post("/s/" + "A" * 43 + "/request/code",
                             data={"csrf_token": token, "code": "123456"})]
    assert {p.status_code for p in pages} == {404}
    assert not AccessRequest.select().exists()


def test_a_hostile_name_stays_one_unproven_line_in_the_senders_mail(fwd):
    name = "Eve\r\nBcc: victim@evil.example\r\n\r\napprove\u202e\u0000 <b>x</b>" + "y" * 300
    ask(fwd, name=name)
    confirm(fwd, last_code(fwd))
    [(row, msg)] = mails(fwd.runtime, "access_request")
    raw = outbox.open_message(fwd.runtime, row).decode()
    assert "Bcc:" not in raw.split("\r\n\r\n", 1)[0] and msg["Bcc"] is None
    lines = body(msg).splitlines()
    [line] = [x for x in lines if x.startswith("Name they gave (not checked): ")]
    assert line.startswith("Name they gave (not checked): Eve Bcc: victim@evil.example approve")
    assert "\u202e" not in line and "\u0000" not in line
    assert len(AccessRequest.get().name) == 100
    html = msg.get_body(("html",)).get_content()
    assert "<b>x</b>" not in html  # escaped in the HTML part


@pytest.mark.parametrize("address", [
    "Eve <eve@evil.example>, victim@other.example", "eve@evil.example\r\nBcc: x@y.example",
    "a" * 400 + "@evil.example"])
def test_a_hostile_address_gets_no_code(fwd, address):
    assert ask(fwd, address).status_code == 400
    assert not OutboundMessage.select().exists()


def test_guessing_tokens_on_the_request_page_is_rate_limited(fwd):
    answers = [fwd.client.get(f"/s/{'F' * 40}{n:03d}/request").status_code for n in range(31)]
    assert answers[:30] == [404] * 30 and answers[30] == 429
