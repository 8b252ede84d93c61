"""The link flow: the link page only shows; proving the mailbox with a code, creating an
account or signing in, and claiming — each a POST; other accounts, scanners, bad tokens and
forged forms get nothing."""

from __future__ import annotations

import dataclasses
import datetime as dt
import email
import email.policy
import re
from types import SimpleNamespace

import pytest

from mailbridge.clock import ManualClock
from mailbridge.outbound import outbox
from mailbridge.store import sealed, tokens
from mailbridge.store.models import (
    Account,
    AuditEvent,
    Document,
    Grant,
    OneTimeCode,
    OutboundMessage,
    Share,
    WebSession,
)
from mailbridge.web import create_app, sessions
from tests.helpers import add_jane
from tests.portal_helpers import (
    PASSWORD,
    csrf,
    form_token,
    make_account,
    make_app,
    make_share,
    portal_runtime,
    without_csrf,
)


@pytest.fixture
def portal(runtime):
    clock = ManualClock(dt.datetime(2026, 11, 28, 12, 0))
    rt = dataclasses.replace(runtime, clock=clock)
    member = add_jane()
    share = Share.create(clinic=member.clinic, sender=member, created_at=clock(),
                         dedupe_key="k", reply_key_hash="r")
    sealed.seal_share(rt.phi_key, share, "POC R.T.", "")
    document = Document.create(share=share, position=0, kind="pdf",
                               content_type="application/pdf", size=1, sha256="0",
                               blob_id="b" * 32, blob_key=b"")
    sealed.seal_document_name(rt.phi_key, document, "secret-name.pdf")
    token = tokens.new_link_token()
    grant = Grant.create(share=share, address="dr@x.example", token_hash=tokens.hash_token(token),
                         deadline=clock() + dt.timedelta(hours=24), created_at=clock())
    app = create_app(rt.settings, runtime=rt)
    return app.test_client(), token, grant, clock


def test_pending_link_shows_who_and_how_many_without_phi(portal):
    client, token, grant, _ = portal
    page = client.get(f"/s/{token}", headers={"User-Agent": "Scanner/1.0"})
    text = page.get_data(as_text=True)
    assert page.status_code == 200
    assert "Jane Doe at Riverside PT shared 1 document with you" in text
    assert "secret-name" not in text and "POC R.T." not in text
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert page.headers["Cache-Control"] == "no-store"
    event = AuditEvent.get(AuditEvent.kind == "link_shown")
    assert event.grant_id == grant.id and event.user_agent == "Scanner/1.0"


def test_scanner_fetches_change_nothing(portal):
    client, token, grant, _ = portal
    for _ in range(5):
        assert client.get(f"/s/{token}").status_code == 200
        assert client.head(f"/s/{token}").status_code == 200
    fresh = Grant.get_by_id(grant.id)
    assert fresh.state == "pending" and fresh.claimed_at is None
    assert "Set-Cookie" not in client.get(f"/s/{token}").headers


def test_expired_link_says_whom_to_ask_even_before_the_job_ran(portal):
    client, token, _, clock = portal
    clock.advance(hours=24, seconds=1)
    text = client.get(f"/s/{token}").get_data(as_text=True)
    assert "expired" in text and "ask" in text and "Jane Doe" in text


def test_revoked_and_claimed_pages(portal):
    client, token, grant, _ = portal
    Grant.update(state="revoked").where(Grant.id == grant.id).execute()
    assert "revoked" in client.get(f"/s/{token}").get_data(as_text=True)
    Grant.update(state="claimed").where(Grant.id == grant.id).execute()
    assert "already been claimed" in client.get(f"/s/{token}").get_data(as_text=True)


def test_unknown_tokens_get_one_identical_not_found(portal):
    client = portal[0]
    pages = [client.get(f"/s/{t}") for t in ("x", "A" * 43, "A" * 500)]
    assert {p.status_code for p in pages} == {404}
    assert len({without_csrf(p) for p in pages}) == 1


# --- the flow after the link page: prove the mailbox, create an account or sign in, claim ----

ADDRESS = "dr.smith@ortho.example"
OTHER = "someone.else@elsewhere.example"
GOOD_PASSWORD = "plaster mango kettle river"


@pytest.fixture
def flow(runtime):
    rt = portal_runtime(runtime)
    share, links = make_share(rt, recipients=(ADDRESS,))
    return SimpleNamespace(runtime=rt, clock=rt.clock, share=share, token=links[ADDRESS],
                           grant=Grant.get(Grant.address == ADDRESS),
                           client=make_app(rt).test_client())


def post(client, path: str, page: str, **data):
    """POST a form as a browser would: with the CSRF token of the page it came from."""
    return client.post(path, data={"csrf_token": csrf(client, page), **data})


def send_code(f, client=None):
    client = client or f.client
    return post(client, f"/s/{f.token}/code", f"/s/{f.token}/next")


def latest_code_email(runtime):
    row = (OutboundMessage.select().where(OutboundMessage.kind == "code")
           .order_by(OutboundMessage.id.desc()).first())
    raw = outbox.open_message(runtime, row)
    return row, raw, email.message_from_bytes(raw, policy=email.policy.default)


def latest_code(runtime) -> str:
    _, _, msg = latest_code_email(runtime)
    return re.search(r"\b(\d{6})\b", msg.get_body(("plain",)).get_content()).group(1)


def other_code(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


def verify(f, code: str, client=None):
    client = client or f.client
    return post(client, f"/s/{f.token}/verify", f"/s/{f.token}/next", code=code)


def register(f, password: str, client=None):
    client = client or f.client
    return post(client, f"/s/{f.token}/register", f"/s/{f.token}/next", password=password)


def grant_of(f) -> Grant:
    return Grant.get_by_id(f.grant.id)


def test_first_time_recipient_proves_the_mailbox_creates_an_account_and_claims(flow):
    f, client = flow, flow.client
    link = client.get(f"/s/{f.token}").get_data(as_text=True)
    # Continue is a form: pressing it is a person's step, a scanner's fetch of the page is not.
    assert f'action="/s/{f.token}/continue"' in link and 'method="post"' in link
    assert client.post(f"/s/{f.token}/continue").headers["Location"].endswith(
        f"/s/{f.token}/next")

    first = client.get(f"/s/{f.token}/next").get_data(as_text=True)
    assert "Send me a code" in first and ADDRESS in first and "Riverside PT" in first
    assert "plan-of-care" not in first and "POC for R.T." not in first

    assert send_code(f).status_code == 302
    assert f.runtime.wake_dispatcher.is_set()
    row, raw, msg = latest_code_email(f.runtime)
    assert row.to_addr == ADDRESS and row.grant_id == f.grant.id and msg["To"] == ADDRESS
    code = latest_code(f.runtime)
    assert code in msg["Subject"]
    for secret in (b"plan-of-care", b"POC for R.T.", b"Please review"):
        assert secret not in raw
    stored = OneTimeCode.get(OneTimeCode.grant == f.grant)
    assert code not in stored.code_hash
    assert AuditEvent.select().where(AuditEvent.kind == "code_sent").count() == 1

    page = client.get(f"/s/{f.token}/next").get_data(as_text=True)
    assert 'name="code"' in page and "send another code" in page

    wrong = verify(f, other_code(code))
    assert wrong.status_code == 400 and "not right" in wrong.get_data(as_text=True)
    assert AuditEvent.select().where(AuditEvent.kind == "code_failed").count() == 1

    assert verify(f, code[:3] + " " + code[3:]).status_code == 302
    assert OneTimeCode.get_by_id(stored.id).used_at is not None
    assert AuditEvent.select().where(AuditEvent.kind == "code_verified").count() == 1
    assert 'name="password"' in client.get(f"/s/{f.token}/next").get_data(as_text=True)

    weak = register(f, "short")
    assert weak.status_code == 400 and "at least 12 characters" in weak.get_data(as_text=True)
    assert not Account.select().exists()

    done = register(f, GOOD_PASSWORD)
    assert done.status_code == 302 and done.headers["Location"].endswith("/library")
    account = Account.get(Account.email == ADDRESS)
    assert account.password_hash.startswith("$argon2id$")
    grant = grant_of(f)
    assert grant.state == "claimed" and grant.account_id == account.id
    assert client.get_cookie("mb_session") is not None
    assert WebSession.get(WebSession.account == account).ended_at is None
    device = [h for h in done.headers.getlist("Set-Cookie") if h.startswith("mb_device=")]
    assert device and "HttpOnly" in device[0] and "SameSite=Lax" in device[0]
    # The link now leads straight to the library.
    assert client.get(f"/s/{f.token}/next").headers["Location"].endswith("/library")


def test_a_code_expires_after_ten_minutes(flow):
    send_code(flow)
    code = latest_code(flow.runtime)
    flow.clock.advance(minutes=10, seconds=1)
    page = verify(flow, code)
    assert page.status_code == 400 and "expired" in page.get_data(as_text=True)
    assert "name=\"password\"" not in flow.client.get(f"/s/{flow.token}/next").get_data(
        as_text=True)


def test_five_wrong_tries_kill_the_code(flow):
    send_code(flow)
    code = latest_code(flow.runtime)
    answers = [verify(flow, other_code(code)).get_data(as_text=True) for _ in range(5)]
    assert "not right" in answers[0] and "new code" in answers[-1]
    dead = verify(flow, code)
    assert dead.status_code == 400 and "new code" in dead.get_data(as_text=True)
    assert OneTimeCode.get(OneTimeCode.grant == flow.grant).used_at is None


def test_a_code_works_once(flow):
    send_code(flow)
    code = latest_code(flow.runtime)
    assert verify(flow, code).status_code == 302
    elsewhere = make_app(flow.runtime).test_client()
    again = verify(flow, code, client=elsewhere)
    assert again.status_code == 400 and "already used" in again.get_data(as_text=True)
    assert "Send me a code" in elsewhere.get(f"/s/{flow.token}/next").get_data(as_text=True)


def test_a_new_code_makes_the_old_one_useless(flow):
    send_code(flow)
    old = latest_code(flow.runtime)
    send_code(flow)
    new = latest_code(flow.runtime)
    if old != new:  # one chance in a million they are equal
        assert verify(flow, old).status_code == 400
    assert verify(flow, new).status_code == 302


def test_at_most_three_codes_per_link_in_fifteen_minutes(flow):
    for _ in range(3):
        assert send_code(flow).status_code == 302
    fourth = send_code(flow)
    assert fourth.status_code == 429 and "we just sent you a code" in fourth.get_data(
        as_text=True).lower()
    assert OneTimeCode.select().count() == 3 and OutboundMessage.select().count() == 3
    flow.clock.advance(minutes=15, seconds=1)
    assert send_code(flow).status_code == 302
    assert OneTimeCode.select().count() == 4


def test_an_existing_account_signs_in_with_the_address_fixed(flow):
    make_account(flow.runtime, ADDRESS)
    page = flow.client.get(f"/s/{flow.token}/next").get_data(as_text=True)
    assert ADDRESS in page and 'name="password"' in page and 'name="email"' not in page
    assert "Send me a code" not in page
    # Nothing to prove by code: no code is sent for an address that has an account.
    send_code(flow)
    assert not OneTimeCode.select().exists()

    path, page_path = f"/s/{flow.token}/signin", f"/s/{flow.token}/next"
    wrong = post(flow.client, path, page_path, password="not the password at all")
    text = wrong.get_data(as_text=True)
    assert wrong.status_code == 400 and "The password is not right" in text
    assert 'href="/forgot"' in text and grant_of(flow).state == "pending"

    right = post(flow.client, path, page_path, password=PASSWORD)
    assert right.status_code == 302 and right.headers["Location"].endswith("/library")
    assert grant_of(flow).state == "claimed"
    assert any(h.startswith("mb_device=") for h in right.headers.getlist("Set-Cookie"))


def test_someone_else_signed_in_sees_nothing_of_the_share_and_cannot_claim(flow):
    _, links = make_share(flow.runtime, recipients=(OTHER,))
    make_account(flow.runtime, OTHER)
    own = links[OTHER]
    post(flow.client, f"/s/{own}/signin", f"/s/{own}/next", password=PASSWORD)
    assert flow.client.get("/library").status_code == 200  # their own claim, now shown

    page = flow.client.get(f"/s/{flow.token}/next")
    text = page.get_data(as_text=True)
    assert page.status_code == 403 and "This link was sent to someone else" in text
    main = text.split("<main", 1)[1]
    for detail in ("Jane Doe", "Riverside", "document", ADDRESS):
        assert detail not in main
    assert 'action="/signout"' in text
    event = AuditEvent.get(AuditEvent.kind == "access_denied")
    assert event.detail == {"reason": "wrong_account"} and event.grant_id == flow.grant.id

    token = form_token(text)
    for action in ("claim", "code", "signin", "register"):
        refused = flow.client.post(f"/s/{flow.token}/{action}",
                                   data={"csrf_token": token, "password": PASSWORD})
        assert refused.status_code == 403
    assert grant_of(flow).state == "pending" and not OneTimeCode.select().exists()
    assert AuditEvent.select().where(AuditEvent.kind == "access_denied").count() == 5


def test_an_old_link_never_replaces_an_existing_password(flow):
    send_code(flow)
    assert verify(flow, latest_code(flow.runtime)).status_code == 302
    account = make_account(flow.runtime, ADDRESS)  # made meanwhile, e.g. through another link
    answer = register(flow, GOOD_PASSWORD)
    assert "already have an account" in answer.get_data(as_text=True)
    assert Account.get_by_id(account.id).password_hash == account.password_hash
    assert grant_of(flow).state == "pending"

    # Without a proven mailbox the register step does nothing at all.
    fresh = make_app(flow.runtime).test_client()
    assert register(flow, GOOD_PASSWORD, client=fresh).status_code == 302
    assert Account.get_by_id(account.id).password_hash == account.password_hash
    assert Account.select().count() == 1


def test_register_needs_a_proven_mailbox(flow):
    answer = register(flow, GOOD_PASSWORD)
    assert answer.status_code == 302 and not Account.select().exists()


def test_an_expired_link_cannot_be_claimed_even_with_a_verified_code(runtime):
    rt = portal_runtime(runtime)
    share, links = make_share(rt, recipients=(ADDRESS,), hours=0.1)  # six minutes
    f = SimpleNamespace(runtime=rt, clock=rt.clock, token=links[ADDRESS],
                        grant=Grant.get(Grant.address == ADDRESS),
                        client=make_app(rt).test_client())
    send_code(f)
    assert verify(f, latest_code(rt)).status_code == 302
    # The password form is open when the deadline passes.
    form_token = csrf(f.client, f"/s/{f.token}/next")
    f.clock.advance(minutes=7)
    answer = f.client.post(f"/s/{f.token}/register",
                           data={"csrf_token": form_token, "password": GOOD_PASSWORD})
    text = " ".join(answer.get_data(as_text=True).split())
    assert "expired" in text and "Jane Doe at Riverside PT can send you a new one" in text
    assert Account.select().where(Account.email == ADDRESS).exists()  # the account is kept
    grant = grant_of(f)
    assert grant.state == "pending" and grant.account_id is None
    claim = post(f.client, f"/s/{f.token}/claim", "/library")
    assert "expired" in claim.get_data(as_text=True) and grant_of(f).state == "pending"


def test_a_claimed_link_that_is_later_revoked_says_so(flow):
    make_account(flow.runtime, ADDRESS)
    post(flow.client, f"/s/{flow.token}/signin", f"/s/{flow.token}/next", password=PASSWORD)
    assert grant_of(flow).state == "claimed"
    Grant.update(state="revoked").where(Grant.id == flow.grant.id).execute()
    page = flow.client.get(f"/s/{flow.token}/next")
    assert page.status_code == 200 and "revoked" in page.get_data(as_text=True)


def test_signed_in_owner_claims_with_one_button(flow):
    _, links = make_share(flow.runtime, recipients=(ADDRESS,))
    make_account(flow.runtime, ADDRESS)
    post(flow.client, f"/s/{links[ADDRESS]}/signin", f"/s/{links[ADDRESS]}/next",
         password=PASSWORD)
    page = flow.client.get(f"/s/{flow.token}/next").get_data(as_text=True)
    assert f'action="/s/{flow.token}/claim"' in page and grant_of(flow).state == "pending"
    done = post(flow.client, f"/s/{flow.token}/claim", f"/s/{flow.token}/next")
    assert done.headers["Location"].endswith("/library") and grant_of(flow).state == "claimed"


def test_a_post_without_csrf_token_changes_nothing(flow):
    send_code(flow)
    code = latest_code(flow.runtime)
    for action, data in (("code", {}), ("verify", {"code": code}),
                         ("register", {"password": GOOD_PASSWORD}),
                         ("claim", {}), ("signin", {"password": PASSWORD})):
        assert flow.client.post(f"/s/{flow.token}/{action}", data=data).status_code == 400
    assert OneTimeCode.select().count() == 1
    assert OneTimeCode.get(OneTimeCode.grant == flow.grant).used_at is None
    assert not Account.select().exists() and grant_of(flow).state == "pending"


def test_scanners_and_previews_change_nothing_on_any_page(flow):
    for _ in range(5):
        for method in (flow.client.get, flow.client.head):
            shown = method(f"/s/{flow.token}")
            assert shown.status_code == 200 and "Set-Cookie" not in shown.headers
            assert method(f"/s/{flow.token}/next").status_code == 200
    grant = grant_of(flow)
    assert grant.state == "pending" and grant.account_id is None
    assert not OneTimeCode.select().exists() and not Account.select().exists()
    assert not OutboundMessage.select().exists()
    assert not WebSession.select().exists()  # nothing stored server-side for anyone


def test_every_bad_token_gets_the_same_not_found_on_every_step(flow):
    token = csrf(flow.client, f"/s/{flow.token}/next")
    pages = [flow.client.get(f"/s/{t}/next") for t in ("x", "A" * 43, "A" * 500)]
    pages += [flow.client.post(f"/s/{'B' * 43}/{action}", data={"csrf_token": token})
              for action in ("code", "verify", "register", "signin", "claim")]
    pages.append(flow.client.get("/s/" + "C" * 43))
    assert {p.status_code for p in pages} == {404}
    assert len({without_csrf(p) for p in pages}) == 1


def test_guessing_tokens_is_rate_limited(flow):
    answers = [flow.client.get(f"/s/{'D' * 40}{n:03d}/next").status_code for n in range(31)]
    assert answers[:30] == [404] * 30 and answers[30] == 429
    answers = [flow.client.get(f"/s/{'E' * 40}{n:03d}").status_code for n in range(31)]
    assert answers[-1] == 429


# --- sessions and the audit trail of anonymous visitors --------------------------------------


def test_a_session_planted_before_the_code_never_holds_the_proven_mailbox(flow):
    f = flow
    attacker = f.client
    attacker.get(f"/s/{f.token}/next")  # the attacker's own anonymous cookie ...
    planted = attacker.get_cookie(sessions.ANON_COOKIE).value
    victim = make_app(f.runtime).test_client()
    victim.set_cookie(sessions.ANON_COOKIE, planted)  # ... planted in the victim's browser
    send_code(f, victim)
    assert verify(f, latest_code(f.runtime), victim).status_code == 302
    assert victim.get_cookie(sessions.ANON_COOKIE).value != planted
    # The attacker's copy proves nothing: no account can be made with it.
    attacker.set_cookie(sessions.ANON_COOKIE, planted)
    assert register(f, GOOD_PASSWORD, attacker).status_code == 302
    assert not Account.select().exists()
    # The victim goes on as usual.
    assert register(f, GOOD_PASSWORD, victim).status_code == 302
    assert Account.select().count() == 1


def test_a_forged_or_stale_anonymous_cookie_is_a_fresh_start(flow):
    f = flow
    f.client.get(f"/s/{f.token}/next")
    send_code(f)
    assert verify(f, latest_code(f.runtime)).status_code == 302
    good = f.client.get_cookie(sessions.ANON_COOKIE).value
    forged = good[:-4] + ("AAAA" if good[-4:] != "AAAA" else "BBBB")
    f.client.set_cookie(sessions.ANON_COOKIE, forged)
    assert 'name="password"' not in f.client.get(f"/s/{f.token}/next").get_data(as_text=True)
    f.client.set_cookie(sessions.ANON_COOKIE, good)
    f.clock.advance(minutes=16)  # past the idle timeout
    assert 'name="password"' not in f.client.get(f"/s/{f.token}/next").get_data(as_text=True)


def test_anonymous_pages_store_no_session_rows(flow):
    for _ in range(20):
        assert flow.client.get("/signin").status_code == 200
        assert flow.client.get(f"/s/{flow.token}/next").status_code == 200
    send_code(flow)
    assert not WebSession.select().exists()


def test_repeated_link_views_by_one_client_are_one_event_an_hour(flow):
    scanner = {"User-Agent": "Scanner/2.0"}
    for _ in range(10):
        flow.client.get(f"/s/{flow.token}", headers=scanner)
    flow.client.get(f"/s/{flow.token}", headers={"User-Agent": "Mozilla/5.0"})
    shown = AuditEvent.select().where(AuditEvent.kind == "link_shown")
    assert sorted(e.user_agent for e in shown) == ["Mozilla/5.0", "Scanner/2.0"]
    flow.clock.advance(minutes=61)
    flow.client.get(f"/s/{flow.token}", headers=scanner)
    assert shown.count() == 3
