"""The e-mails mailbridge writes: what each one says, which headers it carries, and that a
recipient's link e-mail never reveals what was shared."""

from __future__ import annotations

import datetime as dt
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from mailbridge.config import load_settings
from mailbridge.outbound import compose

LINK = "http://localhost:8080/s/Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG0"


@pytest.fixture
def settings(tmp_path):
    return load_settings(None, env={
        "MAILBRIDGE_SERVICE_BASE_URL": "http://localhost:8080",
        "MAILBRIDGE_ADDRESSES_SHARING": "share@portal.example",
        "MAILBRIDGE_ADDRESSES_REPLY_DOMAIN": "reply.portal.example",
        "MAILBRIDGE_OUTBOUND_FROM": "mailbridge@portal.example",
        "MAILBRIDGE_SERVICE_DATA_DIR": str(tmp_path),
    })


NOTICE_DETAILS = {
    "reply_not_allowed": {"admins": False},
    "reply_unknown": {"admins": False},
    "no_recipients": {},
    "bad_recipient": {"address": "dr.smith@@ortho"},
    "own_address": {"address": "share@portal.example"},
    "too_many_recipients": {"count": 27, "limit": 20},
    "no_attachments": {},
    "disallowed_type": {"filename": "setup.exe", "allowed": ["pdf", "png", "docx"]},
    "too_large": {"filename": "scan-all.pdf", "limit_bytes": 30 * 1024 * 1024},
    "too_large_total": {"limit_bytes": 60 * 1024 * 1024},
    "too_many_parts": {"limit": 100},
    "too_deep": {"limit": 8},
    "tnef": {},
    "unreadable_attachment": {"filename": "locked.pdf"},
    "link_undeliverable": {"address": "dr.smith@ortho.example", "status": "5.1.1"},
}

# What a member reading each notice must find: the problem and how to fix it.
NOTICE_SAYS = {
    "reply_not_allowed": ["Only the person who shared these documents can manage the share",
                          "nothing was changed"],
    "reply_unknown": ["did not match any share", "reply to the receipt"],
    "no_recipients": ["To: dr.smith@ortho.example",
                      "share+dr.smith=ortho.example@portal.example"],
    "bad_recipient": ["dr.smith@@ortho", "not a valid e-mail address"],
    "own_address": ["share@portal.example", "cannot receive"],
    "too_many_recipients": ["27", "at most 20"],
    "no_attachments": ["no attachments"],
    "disallowed_type": ["setup.exe", "PDF, PNG, DOCX"],
    "too_large": ["scan-all.pdf", "30 MB"],
    "too_large_total": ["60 MB"],
    "too_many_parts": ["100"],
    "too_deep": ["8 levels"],
    "tnef": ["winmail.dat", "HTML or Plain Text"],
    "unreadable_attachment": ["locked.pdf", "password"],
    "link_undeliverable": ["dr.smith@ortho.example", "refused it (status 5.1.1)",
                           "share the documents again", "resend dr.smith@ortho.example"],
}


def link(settings, **overrides) -> EmailMessage:
    values = dict(to="dr.smith@ortho.example", link_url=LINK, clinic_name="Riverside PT",
                  sender_name="Dr. Jane Doe", document_count=2,
                  deadline_text="Sunday 29 November 2026, 09:00 (America/New_York)")
    return compose.link_email(settings, **{**values, **overrides})


def receipt(settings, **overrides) -> EmailMessage:
    values = dict(to="jane.doe@clinic.example", sender_name="Jane Doe",
                  share_title="POC for patient Rosalind Tuckerman",
                  recipients=["dr.smith@ortho.example", "claims@insurer.example"],
                  filenames=["tuckerman-plan-of-care.pdf", "tuckerman-progress-note.pdf"],
                  deadline_text="Sunday 29 November 2026, 09:00 (America/New_York)",
                  reply_address="reply+0123456789abcdef@reply.portal.example",
                  in_reply_to="<original-123@clinic.example>")
    return compose.receipt_email(settings, **{**values, **overrides})


def notice(settings, code: str, in_reply_to: str | None = "<orig@clinic.example>"):
    return compose.notice_email(settings, to="jane.doe@clinic.example", code=code,
                                details=NOTICE_DETAILS[code], in_reply_to=in_reply_to)


def reparsed(msg: EmailMessage) -> EmailMessage:
    """The message as a mail client will see it."""
    return BytesParser(policy=policy.default).parsebytes(bytes(msg))


def texts(msg: EmailMessage) -> list[str]:
    return [part.get_content() for part in msg.walk() if part.get_content_maintype() == "text"]


def all_messages(settings) -> list[EmailMessage]:
    return [link(settings), receipt(settings),
            *(notice(settings, code) for code in sorted(compose.NOTICE_CODES))]


def test_link_email_reveals_nothing_of_the_share(settings):
    # The same share's receipt carries its subject and filenames; the link e-mail must not.
    secrets = ["Rosalind", "Tuckerman", "tuckerman-plan-of-care", "progress-note", ".pdf",
               "POC for patient"]
    assert any(s in t for t in texts(reparsed(receipt(settings))) for s in secrets)
    msg = reparsed(link(settings))
    raw = bytes(msg).decode("ascii", "replace")
    for secret in secrets:
        assert secret not in raw
        assert all(secret not in text for text in texts(msg))
        assert secret not in str(msg["Subject"])


def test_link_email_says_who_shared_what_and_how_to_claim(settings):
    msg = reparsed(link(settings))
    assert msg["Subject"] == "Dr. Jane Doe at Riverside PT shared 2 documents with you"
    assert msg["To"] == "dr.smith@ortho.example"
    assert msg["From"].addresses[0].addr_spec == "mailbridge@portal.example"
    plain = msg.get_body(("plain",)).get_content()
    assert LINK in plain
    # The link survives intact in the raw bytes too, for clients that show the source.
    assert LINK.encode() in bytes(msg)
    assert "Sunday 29 November 2026, 09:00" in plain
    assert "free account" in plain
    assert "works only for dr.smith@ortho.example" in plain
    html = msg.get_body(("html",)).get_content()
    assert f'href="{LINK}"' in html


def test_link_email_subject_for_one_document(settings):
    msg = link(settings, document_count=1)
    assert msg["Subject"] == "Dr. Jane Doe at Riverside PT shared 1 document with you"


@pytest.mark.parametrize("index", range(2 + len(compose.NOTICE_CODES)))
def test_every_message_is_marked_automatic_and_has_plain_text(settings, index):
    msg = reparsed(all_messages(settings)[index])
    assert msg["Auto-Submitted"] in ("auto-generated", "auto-replied")
    assert msg["Message-ID"].endswith("@reply.portal.example>")
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"] is not None
    assert msg.get_body(("plain",)) is not None
    assert msg["Subject"]


def test_message_ids_are_unique(settings):
    ids = {m["Message-ID"] for m in all_messages(settings) + all_messages(settings)}
    assert len(ids) == 2 * (2 + len(compose.NOTICE_CODES))


def test_date_follows_the_given_clock(settings):
    msg = link(settings, now=dt.datetime(2026, 11, 28, 14, 5, 0))
    assert msg["Date"] == "Sat, 28 Nov 2026 14:05:00 +0000"


def test_receipt_lists_recipients_files_and_reply_commands(settings):
    msg = reparsed(receipt(settings))
    assert msg["Reply-To"] == "reply+0123456789abcdef@reply.portal.example"
    assert msg["In-Reply-To"] == "<original-123@clinic.example>"
    assert msg["References"] == "<original-123@clinic.example>"
    assert msg["Auto-Submitted"] == "auto-replied"
    for text in texts(msg):
        for expected in ("tuckerman-plan-of-care.pdf", "tuckerman-progress-note.pdf",
                         "dr.smith@ortho.example", "claims@insurer.example",
                         "Sunday 29 November 2026", "status", "resend"):
            assert expected in text
    plain = msg.get_body(("plain",)).get_content()
    assert "revoke <address>" in plain


def test_receipt_without_original_is_auto_generated(settings):
    msg = receipt(settings, in_reply_to=None)
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["In-Reply-To"] is None


def test_receipt_html_escapes_filenames(settings):
    msg = reparsed(receipt(settings, filenames=["<img src=x onerror=alert(1)>.pdf"]))
    html = msg.get_body(("html",)).get_content()
    assert "<img" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;.pdf" in html
    # The plain text shows the name as it is.
    assert "<img src=x onerror=alert(1)>.pdf" in msg.get_body(("plain",)).get_content()


def test_header_values_cannot_inject_headers(settings):
    msg = reparsed(receipt(settings, share_title="Hi\r\nBcc: victim@evil.example"))
    assert msg["Bcc"] is None
    assert msg["Subject"] == "Shared: Hi Bcc: victim@evil.example"


@pytest.mark.parametrize("code", sorted(compose.NOTICE_CODES))
def test_every_notice_names_the_problem_and_the_fix(settings, code):
    msg = reparsed(notice(settings, code))
    body = " ".join(msg.get_body(("plain",)).get_content().split())
    for expected in NOTICE_SAYS[code]:
        assert " ".join(expected.split()) in body
    assert msg["To"] == "jane.doe@clinic.example"
    assert msg["In-Reply-To"] == "<orig@clinic.example>"
    assert msg["Auto-Submitted"] == "auto-replied"
    if code not in ("link_undeliverable", "reply_not_allowed", "reply_unknown"):
        assert msg["Subject"] == "Your e-mail to share@portal.example could not be shared"


def test_notice_without_original_is_auto_generated(settings):
    msg = notice(settings, "link_undeliverable", in_reply_to=None)
    assert msg["Auto-Submitted"] == "auto-generated"
    assert "dr.smith@ortho.example" not in msg["Subject"]


def test_unknown_notice_code_is_a_programming_error(settings):
    with pytest.raises(ValueError, match="unknown notice code"):
        compose.notice_email(settings, to="jane.doe@clinic.example", code="no_such_code",
                             details={}, in_reply_to=None)


def test_notice_missing_a_detail_fails_loudly(settings):
    with pytest.raises(Exception, match="filename"):
        compose.notice_email(settings, to="jane.doe@clinic.example", code="too_large",
                             details={"limit_bytes": 10}, in_reply_to=None)


def test_templates_can_be_replaced(settings, tmp_path):
    custom = tmp_path / "templates"
    custom.mkdir()
    for name in ("base.txt", "base.html", "link.html"):
        (custom / name).write_text((compose.EMAIL_TEMPLATES / name).read_text())
    (custom / "link.txt").write_text(
        '{% extends "base.txt" %}\n{% block subject %}Documents from {{ clinic_name }}'
        '{% endblock %}\n{% block body %}\nOpen {{ link_url }}\n{% endblock %}\n')
    msg = link(settings, templates=custom)
    assert msg["Subject"] == "Documents from Riverside PT"
    assert msg.get_body(("plain",)).get_content().startswith(f"Open {LINK}\n")


def every_kind_of_email(settings) -> list[EmailMessage]:
    """One of each e-mail we send, recipients' and members' alike."""
    about = compose.ShareRef(title="POC for R.T.", shared_text="Sat 28 Nov 2026, 07:00 EST",
                             recipients=("dr.smith@ortho.example",),
                             receipt_subject="Shared: POC for R.T.",
                             receipt_message_id="<r1@reply.portal.example>")
    member = "jane.doe@clinic.example"
    command_values = dict(sender_name="Jane Doe", claim_hours="24", summary="Done.",
                          lines=["dr.smith@ortho.example: access withdrawn"],
                          changed=["dr.smith@ortho.example"])
    return [
        *all_messages(settings),
        compose.code_email(settings, to="dr.smith@ortho.example", code="123456", minutes=10),
        compose.reset_email(settings, to="dr.smith@ortho.example", reset_url=LINK, minutes=30),
        compose.staff_code_email(settings, to=member, code="123456", minutes=10),
        compose.recipient_revoked_email(settings, to="dr.smith@ortho.example",
                                        clinic_name="Riverside PT", sender_name="Jane Doe",
                                        contact="Front desk: (555) 010-0200"),
        compose.reminder_email(settings, to="dr.smith@ortho.example", link_url=LINK,
                               clinic_name="Riverside PT", sender_name="Jane Doe",
                               document_count=1, sent_text="Sat", deadline_text="Sun",
                               contact="Front desk: (555) 010-0200"),
        compose.first_view_email(settings, to=member, sender_name="Jane Doe",
                                 recipient="dr.smith@ortho.example", shared_text="Sat",
                                 opened_text="Sat", in_reply_to=None, about=about),
        compose.expiry_summary_email(settings, to=member, sender_name="Jane Doe",
                                     addresses=["dr.smith@ortho.example"], shared_text="Sat",
                                     in_reply_to=None, about=about),
        *(compose.command_reply_email(settings, to=member, command=command,
                                      values={**command_values, "recognised": True},
                                      reply_address=None, in_reply_to=None, about=about)
          for command in ("revoke", "resend", "extend", "help")),
    ]


def test_every_email_has_an_html_part_and_a_readable_text_part(settings):
    for msg in every_kind_of_email(settings):
        msg = reparsed(msg)
        text = msg.get_body(("plain",)).get_content()
        html = msg.get_body(("html",)).get_content()
        assert html.lstrip().lower().startswith("<!doctype html>"), msg["Subject"]
        assert "<p>" in html and "{{" not in html and "{%" not in html
        # No columns made of runs of spaces: they fall apart in a proportional font.
        assert not [line for line in text.splitlines() if "   " in line.strip()], msg["Subject"]


def test_recipient_emails_carry_the_clinic_contact_line(settings):
    contact = "Front desk: (555) 010-0200"
    for msg in (link(settings, contact=contact), *every_kind_of_email(settings)[-8:-6]):
        msg = reparsed(msg)
        assert contact in msg.get_body(("plain",)).get_content(), msg["Subject"]
        assert "(555) 010-0200" in msg.get_body(("html",)).get_content(), msg["Subject"]


@pytest.mark.parametrize("title", [
    "=?utf-7?q?+2AA-?= plan",  # the stdlib decoded it again on setting: a lone surrogate
    "Plan of care for the patient in room twelve, second floor =??q?a=FF?= and more words",
])
def test_encoded_word_text_in_a_title_stays_text_in_the_receipt_subject(settings, title):
    # A member's subject "=?utf-8?q?=3D=3Futf-7...?=" decodes to text that itself reads as an
    # encoded-word; set as our Subject, the stdlib decoded it a second time and raised, so the
    # share was never made. It stays text, with a space after the "=".
    subject = reparsed(receipt(settings, share_title=title))["Subject"]
    assert subject == "Shared: " + title.replace("=?", "= ?")


def test_encoded_word_text_in_the_member_subject_stays_text_in_a_command_reply(settings):
    answer = compose.command_reply_email(
        settings, to="jane.doe@clinic.example", command="help",
        values={"recognised": True, "sender_name": "Jane Doe", "claim_hours": "24"},
        reply_address=None, in_reply_to=None,
        thread_subject="Re: Shared: =?utf-7?q?+2AA-?= " + "word " * 20)
    assert reparsed(answer)["Subject"].startswith("Re: Shared: = ?utf-7?q?+2AA-?= word")
