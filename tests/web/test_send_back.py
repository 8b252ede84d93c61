"""'Send documents back' in the portal (Flask test client): the form on a claimed share, the
upload, every refusal as a page saying what was wrong with nothing stored, other people's and
revoked shares, the per-account rate limit, and the staff console page where the sender opens
the documents (audited on the original share)."""

from __future__ import annotations

import dataclasses
import io
import secrets

import pytest

from mailbridge.clock import system_clock
from mailbridge.shares.members import add_member
from mailbridge.store import tokens
from mailbridge.store.models import (
    AuditEvent,
    Document,
    Grant,
    OutboundMessage,
    SentBack,
    StaffAccount,
    WebSession,
)
from mailbridge.store.states import Audit, GrantState
from tests.helpers import one_page_pdf
from tests.portal_helpers import (
    claim,
    form_token,
    make_account,
    make_app,
    make_share,
    portal_runtime,
    signed_in_client,
)

SMITH = "dr.smith@ortho.example"
JONES = "dr.jones@ortho.example"
SIGNED = one_page_pdf("Signed by Dr Smith")


@pytest.fixture
def portal(runtime):
    rt = portal_runtime(runtime)
    share, _ = make_share(rt, recipients=(SMITH, JONES), title="POC for R.T.")
    smith = make_account(rt, SMITH)
    claim(rt, share, SMITH, smith)
    now = rt.clock()
    StaffAccount.create(member=share.sender, password_hash="x", created_at=now, verified_at=now)
    return rt, make_app(rt), share, smith


def _upload(client, share_id, files, message="", token=None):
    path = f"/library/shares/{share_id}/send-back"
    if token is None:
        token = form_token(client.get(path).get_data(as_text=True))
    data = {"csrf_token": token, "message": message,
            "files": [(io.BytesIO(data), name) for name, data in files]}
    return client.post(path, data=data, content_type="multipart/form-data")


def _stored_files(rt) -> set:
    return {p for p in rt.settings.documents_dir.rglob("*") if p.is_file()}


def _staff_client(app, rt, member):
    sid = secrets.token_urlsafe(32)
    now = rt.clock()
    WebSession.create(id_hash=tokens.hash_token(sid), member=member, data={}, created_at=now,
                      last_seen_at=now)
    client = app.test_client()
    client.set_cookie("mb_session", sid)
    return client


def test_library_offers_it_and_the_form_says_the_rules(portal):
    rt, app, share, smith = portal
    client = signed_in_client(app, rt, smith)
    library = client.get("/library").get_data(as_text=True)
    assert f'href="/library/shares/{share.id}/send-back"' in library
    page = " ".join(client.get(f"/library/shares/{share.id}/send-back").get_data(
        as_text=True).split())
    assert "To Jane Doe at Riverside PT" in page and "POC for R.T." in page
    assert 'enctype="multipart/form-data"' in page and "PDF, " in page
    assert "At most 30 MB each and 60 MB together" in page


def test_upload_sends_the_documents_and_the_sender_is_emailed(portal):
    rt, app, share, smith = portal
    client = signed_in_client(app, rt, smith)
    answer = _upload(client, share.id, [("signed plan.pdf", SIGNED)], "Signed, page 2.")
    assert answer.status_code == 302 and answer.headers["Location"].endswith("/library")
    assert "1 document sent to Jane Doe." in client.get("/library").get_data(as_text=True)
    sent = SentBack.get()
    assert sent.original_id == share.id and sent.address == SMITH and sent.via == "console"
    [document] = Document.select().where(Document.share == sent.share_id)
    assert document.kind == "pdf" and document.size == len(SIGNED)
    assert OutboundMessage.get(OutboundMessage.kind == "documents_returned").to_addr == (
        share.sender.email)
    # Documents sent back are not offered back again in anyone's library.
    assert f"/library/shares/{sent.share_id}/send-back" not in client.get(
        "/library").get_data(as_text=True)


@pytest.mark.parametrize(("name", "data", "shown"), [
    ("invoice.pdf", b"MZ\x90\x00" + bytes(range(256)) * 8,
     "Nothing was sent: “invoice.pdf” is not a type that can be sent."),
    ("page.html", b"<html><script>alert(1)</script></html>" + b"\xff\x00" * 20,
     "Nothing was sent: “page.html” is not a type that can be sent."),
    ("empty.pdf", b"", "Nothing was sent: “empty.pdf” is empty."),
])
def test_a_disallowed_file_gets_a_page_saying_so_and_nothing_is_stored(portal, name, data, shown):
    rt, app, share, smith = portal
    client = signed_in_client(app, rt, smith)
    before = _stored_files(rt)
    answer = _upload(client, share.id, [("good.pdf", SIGNED), (name, data)])
    assert answer.status_code == 400
    assert shown in answer.get_data(as_text=True)
    assert _stored_files(rt) == before and not SentBack.select().exists()
    assert AuditEvent.get(AuditEvent.kind == Audit.RETURN_REFUSED).share_id == share.id


def test_an_oversize_upload_gets_a_page_naming_the_limit(portal):
    rt, _app, share, smith = portal
    smtp = dataclasses.replace(rt.settings.smtp, max_message_bytes=4096)
    small = dataclasses.replace(rt, settings=dataclasses.replace(rt.settings, smtp=smtp))
    app = make_app(small)
    client = signed_in_client(app, small, smith)
    answer = _upload(client, share.id, [("scan.pdf", SIGNED + b" " * 200_000)])
    assert answer.status_code == 413
    assert "larger than the limit of 4 KB for one upload" in answer.get_data(as_text=True)
    assert not SentBack.select().exists()


def test_a_file_over_the_per_file_limit_is_named(portal):
    rt, _app, share, smith = portal
    limits = dataclasses.replace(rt.settings.limits, max_file_bytes=2048)
    small = dataclasses.replace(rt, settings=dataclasses.replace(rt.settings, limits=limits))
    client = signed_in_client(make_app(small), small, smith)
    answer = _upload(client, share.id, [("scan.pdf", SIGNED + b" " * 4000)])
    assert answer.status_code == 400
    assert "“scan.pdf” is larger than the limit of 2 KB per file." in answer.get_data(
        as_text=True)


def test_without_the_csrf_token_nothing_is_stored(portal):
    rt, app, share, smith = portal
    client = signed_in_client(app, rt, smith)
    answer = _upload(client, share.id, [("signed.pdf", SIGNED)], token="forged")
    assert answer.status_code == 400 and "This form has expired" in answer.get_data(as_text=True)
    assert not SentBack.select().exists()


def test_another_accounts_share_answers_like_a_missing_one(portal):
    rt, app, share, _smith = portal
    jones = make_account(rt, JONES)  # has a grant on the share, but never claimed it
    client = signed_in_client(app, rt, jones)
    assert client.get(f"/library/shares/{share.id}/send-back").status_code == 404
    token = form_token(client.get("/library").get_data(as_text=True))
    answer = _upload(client, share.id, [("x.pdf", SIGNED)], token=token)
    assert answer.status_code == 404 and not SentBack.select().exists()
    assert AuditEvent.select().where((AuditEvent.kind == Audit.ACCESS_DENIED)
                                     & (AuditEvent.account == jones)).count() == 2
    assert client.get("/library/shares/99999/send-back").status_code == 404


def test_a_revoked_share_gets_a_clear_page(portal):
    rt, app, share, smith = portal
    client = signed_in_client(app, rt, smith)
    token = form_token(client.get(f"/library/shares/{share.id}/send-back").get_data(as_text=True))
    Grant.update(state=GrantState.REVOKED).where(Grant.address == SMITH).execute()
    page = client.get(f"/library/shares/{share.id}/send-back")
    assert page.status_code == 410
    assert "The sender has withdrawn this share" in page.get_data(as_text=True)
    answer = _upload(client, share.id, [("signed.pdf", SIGNED)], token=token)
    assert answer.status_code == 410 and not SentBack.select().exists()


def test_signed_out_visitors_are_sent_to_sign_in(portal):
    _rt, app, share, _smith = portal
    answer = app.test_client().get(f"/library/shares/{share.id}/send-back")
    assert answer.status_code == 302 and "/signin" in answer.headers["Location"]


def test_uploads_are_rate_limited_per_account(portal):
    rt, app, share, smith = portal
    client = signed_in_client(app, rt, smith)
    token = form_token(client.get(f"/library/shares/{share.id}/send-back").get_data(as_text=True))
    codes = [_upload(client, share.id, [("x.exe", b"MZ" + b"\x00" * 64)], token=token).status_code
             for _ in range(11)]
    assert codes == [400] * 10 + [429]
    # Another browser of the same account counts against the same budget.
    other = signed_in_client(app, rt, smith)
    assert _upload(other, share.id, [("x.pdf", SIGNED)], token=token).status_code == 429


def test_the_sender_opens_them_in_the_console_and_each_fetch_is_audited(portal):
    rt, app, share, smith = portal
    _upload(signed_in_client(app, rt, smith), share.id, [("signed plan.pdf", SIGNED)])
    sent = SentBack.get()
    [document] = Document.select().where(Document.share == sent.share_id)
    staff = _staff_client(app, rt, share.sender)

    listing = staff.get(f"/staff/shares/{share.id}").get_data(as_text=True)
    assert f'href="/staff/returns/{sent.id}"' in listing and f"1 document from {SMITH}" in listing
    sent_page = staff.get("/staff/sent").get_data(as_text=True)
    assert "POC for R.T." in sent_page and "Sent back by" not in sent_page
    page = staff.get(f"/staff/returns/{sent.id}").get_data(as_text=True)
    assert f"Documents sent back by {SMITH}" in page and "signed plan.pdf" in page
    download = staff.get(f"/staff/returns/{sent.id}/documents/{document.id}/download")
    assert download.status_code == 200 and download.get_data() == SIGNED
    assert "signed%20plan.pdf" in download.headers["Content-Disposition"]
    view = staff.get(f"/staff/returns/{sent.id}/documents/{document.id}")
    assert view.headers["Content-Type"] == "application/pdf"
    assert "frame-ancestors 'self'" in view.headers["Content-Security-Policy"]
    kinds = [(e.kind, e.share_id, e.actor) for e in AuditEvent.select().where(
        AuditEvent.kind.in_([Audit.RETURNED_DOCUMENT_VIEWED,
                             Audit.RETURNED_DOCUMENT_DOWNLOADED])).order_by(AuditEvent.seq)]
    email = share.sender.email
    assert kinds == [(Audit.RETURNED_DOCUMENT_DOWNLOADED, share.id, email),
                     (Audit.RETURNED_DOCUMENT_VIEWED, share.id, email)]


def test_another_clinics_member_cannot_open_them(portal):
    rt, app, share, smith = portal
    _upload(signed_in_client(app, rt, smith), share.id, [("signed.pdf", SIGNED)])
    sent = SentBack.get()
    [document] = Document.select().where(Document.share == sent.share_id)
    stranger = add_member("ann@other.example", "Ann", "Other clinic", system_clock(),
                          admin=True)
    staff = _staff_client(app, rt, stranger)
    assert staff.get(f"/staff/returns/{sent.id}").status_code == 404
    assert staff.get(
        f"/staff/returns/{sent.id}/documents/{document.id}/download").status_code == 404
    # A recipient's session is not a member's: the console sends it to sign in.
    assert signed_in_client(app, rt, smith).get(f"/staff/returns/{sent.id}").status_code == 302



def test_hostile_names_and_disguised_pages_are_made_harmless(portal):
    rt, app, share, smith = portal
    client = signed_in_client(app, rt, smith)
    page = b"<html><body><script>alert(document.cookie)</script></body></html>\n"
    answer = _upload(client, share.id, [("../../../etc/passwd.pdf", SIGNED),
                                        ("report.pdf", page)])
    assert answer.status_code == 302
    sent = SentBack.get()
    staff = _staff_client(app, rt, share.sender)
    listing = staff.get(f"/staff/returns/{sent.id}").get_data(as_text=True)
    assert "passwd.pdf" in listing and "../" not in listing
    documents = list(Document.select().where(Document.share == sent.share_id)
                     .order_by(Document.position))
    assert [d.kind for d in documents] == ["pdf", "txt"]
    # The page disguised as a PDF is text: served as text/plain, never as a page of ours.
    served = staff.get(f"/staff/returns/{sent.id}/documents/{documents[1].id}/download")
    assert served.headers["Content-Type"].startswith("text/plain")
    assert served.headers["X-Content-Type-Options"] == "nosniff"
    assert "report.pdf.txt" in served.headers["Content-Disposition"]
    assert staff.get(f"/staff/returns/{sent.id}/documents/{documents[1].id}").status_code == 404


def test_signing_in_to_the_console_leads_to_the_page_the_email_linked(portal):
    from mailbridge.web.passwords import hash_password
    from mailbridge.web.staff_access import page_after_sign_in

    rt, app, share, smith = portal
    _upload(signed_in_client(app, rt, smith), share.id, [("signed.pdf", SIGNED)])
    sent = SentBack.get()
    (StaffAccount.update(password_hash=hash_password("staff console passphrase 7"))
     .where(StaffAccount.member == share.sender).execute())
    browser = app.test_client()
    asked = browser.get(f"/staff/returns/{sent.id}")
    assert asked.status_code == 302 and asked.headers["Location"].endswith("/staff")
    token = form_token(browser.get("/staff").get_data(as_text=True))
    answer = browser.post("/staff/signin", data={"csrf_token": token,
                                                  "email": share.sender.email,
                                                  "password": "staff console passphrase 7"})
    assert answer.status_code == 302
    assert answer.headers["Location"].endswith(f"/staff/returns/{sent.id}")
    # Only our own console pages are ever taken as where to go.
    for stored in ("//evil.example/staff/", "https://evil.example/", "/library", "/staff/\n"):
        with app.test_request_context("/staff"):
            from flask import session

            session["staff_next"] = stored
            assert page_after_sign_in() is None
