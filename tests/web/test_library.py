"""The library: claimed shares newest first with their documents, per-recipient archive, and
nothing from revoked, expired, unclaimed or other people's shares."""

from __future__ import annotations

import datetime as dt

import pytest

from mailbridge.store.models import AuditEvent, Document, Grant, WebSession
from tests.helpers import pdf_bytes
from tests.portal_helpers import (
    claim,
    form_token,
    make_account,
    make_app,
    make_share,
    portal_runtime,
    signed_in_client,
    without_csrf,
)

SMITH = "dr.smith@ortho.example"
JONES = "dr.jones@ortho.example"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


@pytest.fixture
def portal(runtime):
    rt = portal_runtime(runtime)
    smith = make_account(rt, SMITH)
    return rt, make_app(rt), smith


def test_library_groups_documents_by_share_newest_first(portal):
    rt, app, smith = portal
    older, _ = make_share(rt, title="Older plan", documents=[
        ("plan-of-care.pdf", "pdf", "application/pdf", pdf_bytes("a", size=3000)),
        ("Letter.docx", "docx", DOCX, b"PK" + b"x" * (2 * 1024 * 1024))])
    rt.clock.advance(hours=2)
    newer, _ = make_share(rt, title="Newer x-ray", documents=[
        ("x-ray.png", "png", "image/png", b"\x89PNG" + b"x" * 500)])
    claim(rt, older, SMITH, smith)
    claim(rt, newer, SMITH, smith)
    page = signed_in_client(app, rt, smith).get("/library").get_data(as_text=True)

    assert page.index("Newer x-ray") < page.index("Older plan")
    older_part = page[page.index("Older plan"):]
    assert older_part.index("plan-of-care.pdf") < older_part.index("Letter.docx")
    # 12:00 UTC is 07:00 in the clinic's zone (New York)
    assert "From Jane Doe at Riverside PT" in page and "28 Nov 2026, 07:00 EST" in page
    assert "28 Nov 2026, 09:00 EST" in page
    assert "PDF · 3 KB" in page and "DOCX · 2.0 MB" in page and "PNG · 504 bytes" in page
    doc = older.documents.order_by(Document.position).first()
    assert f'href="/documents/{doc.id}"' in page
    assert f'href="/documents/{doc.id}/download"' in page
    assert f'action="/library/shares/{older.id}/archive"' in page


def test_sanitised_note_keeps_its_formatting(portal):
    rt, app, smith = portal
    share, _ = make_share(rt, note_html='<p>Please <strong>review</strong> by Friday.</p>')
    claim(rt, share, SMITH, smith)
    page = signed_in_client(app, rt, smith).get("/library").get_data(as_text=True)
    assert '<div class="note"><p>Please <strong>review</strong> by Friday.</p></div>' in page
    assert "&lt;strong&gt;" not in page


def test_titles_and_names_are_escaped(portal):
    rt, app, smith = portal
    share, _ = make_share(rt, title="<b>R.T.</b>", documents=[
        ("<img src=x>.pdf", "pdf", "application/pdf", pdf_bytes())])
    claim(rt, share, SMITH, smith)
    page = signed_in_client(app, rt, smith).get("/library").get_data(as_text=True)
    assert "&lt;b&gt;R.T.&lt;/b&gt;" in page and "&lt;img src=x&gt;.pdf" in page
    assert "<img src=x>" not in page


def test_empty_library_explains_how_documents_arrive(portal):
    rt, app, smith = portal
    page = signed_in_client(app, rt, smith).get("/library").get_data(as_text=True)
    assert f"When someone shares documents with {SMITH}, open the link in" in page
    assert "Nothing is archived" in signed_in_client(app, rt, smith).get(
        "/library/archived").get_data(as_text=True)


def test_only_claimed_live_shares_of_this_account_appear(portal):
    rt, app, smith = portal
    jones = make_account(rt, JONES)
    mine, _ = make_share(rt, title="Mine", recipients=(SMITH,))
    revoked, _ = make_share(rt, title="Revoked one", recipients=(SMITH,))
    make_share(rt, title="Unclaimed one", recipients=(SMITH,), hours=-1)  # expired link
    theirs, _ = make_share(rt, title="Jones only", recipients=(JONES,))
    claim(rt, mine, SMITH, smith)
    claim(rt, revoked, SMITH, smith)
    claim(rt, theirs, JONES, jones)
    client = signed_in_client(app, rt, smith)
    assert "Revoked one" in client.get("/library").get_data(as_text=True)

    Grant.update(state="revoked").where(Grant.share == revoked).execute()
    for path in ("/library", "/library/archived"):
        answer = client.get(path)
        page = answer.get_data(as_text=True)
        assert answer.status_code == 200
        assert "Revoked one" not in page and "Unclaimed one" not in page
        assert "Jones only" not in page
    assert "Mine" in client.get("/library").get_data(as_text=True)


def test_archive_and_restore_affect_only_this_recipient(portal):
    rt, app, smith = portal
    jones = make_account(rt, JONES)
    share, _ = make_share(rt, title="Shared with both", recipients=(SMITH, JONES))
    smith_grant = claim(rt, share, SMITH, smith)
    claim(rt, share, JONES, jones)
    client = signed_in_client(app, rt, smith)
    token = form_token(client.get("/library").get_data(as_text=True))

    answer = client.post(f"/library/shares/{share.id}/archive", data={"csrf_token": token},
                         headers={"User-Agent": "Browser/1"})
    assert answer.status_code == 302 and answer.headers["Location"] == "/library"
    page = client.get("/library").get_data(as_text=True)
    assert "Moved to Archived" in page and "Shared with both" not in page
    archived = client.get("/library/archived").get_data(as_text=True)
    assert "Shared with both" in archived and "Restore" in archived
    assert "Shared with both" in signed_in_client(app, rt, jones).get(
        "/library").get_data(as_text=True)
    event = AuditEvent.get(AuditEvent.kind == "share_archived")
    assert (event.account_id, event.grant_id, event.share_id) == (smith.id, smith_grant.id,
                                                                  share.id)
    assert event.user_agent == "Browser/1"

    answer = client.post(f"/library/shares/{share.id}/restore", data={"csrf_token": token})
    assert answer.headers["Location"] == "/library/archived"
    assert "Shared with both" in client.get("/library").get_data(as_text=True)
    assert Grant.get_by_id(smith_grant.id).archived_at is None
    assert AuditEvent.select().where(AuditEvent.kind == "share_restored").count() == 1


def test_archiving_someone_elses_share_is_not_found_and_audited(portal):
    rt, app, smith = portal
    jones = make_account(rt, JONES)
    theirs, _ = make_share(rt, recipients=(JONES,))
    jones_grant = claim(rt, theirs, JONES, jones)
    client = signed_in_client(app, rt, smith)
    token = form_token(client.get("/library").get_data(as_text=True))

    refused = client.post(f"/library/shares/{theirs.id}/archive", data={"csrf_token": token})
    missing = client.post("/library/shares/999999/archive", data={"csrf_token": token})
    assert refused.status_code == missing.status_code == 404
    assert without_csrf(refused) == without_csrf(missing)
    assert Grant.get_by_id(jones_grant.id).archived_at is None
    denied = [e for e in AuditEvent.select().where(AuditEvent.kind == "access_denied")]
    assert {(e.share_id, e.detail["reason"]) for e in denied} == {(theirs.id, "not_yours"),
                                                                  (None, "missing")}
    assert all(e.account_id == smith.id for e in denied)


def test_archive_needs_the_form_token(portal):
    rt, app, smith = portal
    share, _ = make_share(rt)
    grant = claim(rt, share, SMITH, smith)
    client = signed_in_client(app, rt, smith)
    assert client.post(f"/library/shares/{share.id}/archive").status_code == 400
    assert Grant.get_by_id(grant.id).archived_at is None


def test_revoked_while_signed_in_cannot_be_archived(portal):
    rt, app, smith = portal
    share, _ = make_share(rt)
    claim(rt, share, SMITH, smith)
    client = signed_in_client(app, rt, smith)
    token = form_token(client.get("/library").get_data(as_text=True))
    Grant.update(state="revoked").where(Grant.share == share).execute()
    assert client.post(f"/library/shares/{share.id}/archive",
                       data={"csrf_token": token}).status_code == 404
    event = AuditEvent.get(AuditEvent.kind == "access_denied")
    assert event.detail["reason"] == "revoked"


@pytest.mark.parametrize("path", ["/library", "/library/archived"])
def test_signed_out_visitors_are_sent_to_sign_in(portal, path):
    _, app, _ = portal
    answer = app.test_client().get(path)
    assert answer.status_code == 302
    assert answer.headers["Location"].startswith("/signin?next=")
    assert "library" in answer.headers["Location"]


def test_an_ended_session_no_longer_opens_the_library(portal):
    rt, app, smith = portal
    client = signed_in_client(app, rt, smith)
    assert client.get("/library").status_code == 200
    WebSession.update(ended_at=rt.clock()).execute()
    assert client.get("/library").status_code == 302


def test_dates_follow_the_clinic_time_zone_across_dst(portal):
    rt, app, smith = portal
    rt.clock.advance(days=200)  # mid-June: daylight saving time in New York
    share, _ = make_share(rt)
    claim(rt, share, SMITH, smith)
    page = signed_in_client(app, rt, smith).get("/library").get_data(as_text=True)
    expected = (rt.clock().replace(tzinfo=dt.UTC) - dt.timedelta(hours=4)).strftime(
        "%d %b %Y, %H:%M EDT")
    assert expected in page


def test_removing_a_share_asks_first_then_is_for_good_and_only_for_this_recipient(portal):
    rt, app, smith = portal
    jones = make_account(rt, JONES)
    share, _ = make_share(rt, title="Shared with both", recipients=(SMITH, JONES))
    smith_grant = claim(rt, share, SMITH, smith)
    claim(rt, share, JONES, jones)
    document = share.documents.get()
    client = signed_in_client(app, rt, smith)
    assert f'href="/library/shares/{share.id}/remove"' in client.get("/library").get_data(
        as_text=True)

    confirm = client.get(f"/library/shares/{share.id}/remove")  # GET changes nothing
    page = confirm.get_data(as_text=True)
    assert confirm.status_code == 200 and "cannot be undone" in page
    assert "Shared with both" in page and "Keep it" in page
    assert Grant.get_by_id(smith_grant.id).removed_at is None
    assert client.post(f"/library/shares/{share.id}/remove").status_code == 400  # no token

    answer = client.post(f"/library/shares/{share.id}/remove",
                         data={"csrf_token": form_token(page)})
    assert answer.status_code == 302 and answer.headers["Location"] == "/library"
    library = client.get("/library").get_data(as_text=True)
    assert "Removed from your library for good." in library
    assert "Shared with both" not in library
    assert "Shared with both" not in client.get("/library/archived").get_data(as_text=True)
    assert client.get(f"/documents/{document.id}/download").status_code == 404
    assert client.get(f"/library/shares/{share.id}/remove").status_code == 404
    # The clinic's record stays: the grant is still there, claimed, marked removed.
    grant = Grant.get_by_id(smith_grant.id)
    assert grant.state == "claimed" and grant.removed_at == rt.clock()
    event = AuditEvent.get(AuditEvent.kind == "share_removed")
    assert (event.account_id, event.grant_id, event.share_id) == (smith.id, grant.id, share.id)
    # The other recipient still has it.
    other = signed_in_client(app, rt, jones)
    assert "Shared with both" in other.get("/library").get_data(as_text=True)
    assert other.get(f"/documents/{document.id}/download").status_code == 200


def test_removing_someone_elses_share_is_not_found(portal):
    rt, app, smith = portal
    jones = make_account(rt, JONES)
    theirs, _ = make_share(rt, recipients=(JONES,))
    jones_grant = claim(rt, theirs, JONES, jones)
    client = signed_in_client(app, rt, smith)
    assert client.get(f"/library/shares/{theirs.id}/remove").status_code == 404
    mine, _ = make_share(rt, recipients=(SMITH,))
    claim(rt, mine, SMITH, smith)
    token = form_token(client.get(f"/library/shares/{mine.id}/remove").get_data(as_text=True))
    refused = client.post(f"/library/shares/{theirs.id}/remove", data={"csrf_token": token})
    assert refused.status_code == 404
    assert Grant.get_by_id(jones_grant.id).removed_at is None
