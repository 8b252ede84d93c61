"""The link page: GET and HEAD only show, for every grant state; unknown tokens all look alike."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from mailbridge import tokens
from mailbridge.clock import ManualClock
from mailbridge.models import AuditEvent, Document, Grant, Share
from mailbridge.web import create_app
from tests.helpers import add_jane


@pytest.fixture
def portal(runtime):
    clock = ManualClock(dt.datetime(2026, 11, 28, 12, 0))
    rt = dataclasses.replace(runtime, clock=clock)
    member = add_jane()
    share = Share.create(clinic=member.clinic, sender=member, title="POC R.T.",
                         created_at=clock(), dedupe_key="k", reply_key_hash="r")
    Document.create(share=share, position=0, filename="secret-name.pdf", kind="pdf",
                    content_type="application/pdf", size=1, sha256="0", blob_id="b" * 32,
                    blob_key=b"")
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
    assert len({p.get_data() for p in pages}) == 1
