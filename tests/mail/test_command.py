"""The reply command extractor: what a member typed above the quoted receipt decides the command,
and nothing quoted (a receipt lists `revoke` among its commands) can ever trigger one."""

from __future__ import annotations

import csv
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.mail.command import (
    COMMANDS,
    Command,
    extract_command,
    first_unquoted_line,
    parse_command,
)
from mailbridge.mail.mime import read_message
from tests.conftest import CORPUS, MAIL

FIXTURES = MAIL
UNRECOGNISED = Command("help", "", recognised=False)
SERVICE = "mailbridge@portal.example"


def fixture(name: str) -> EmailMessage:
    return read_message((FIXTURES / name).read_bytes())


def plain(body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = "Re: Shared: POC"
    msg.set_content(body)
    return read_message(bytes(msg))


def html_only(source: str) -> EmailMessage:
    msg = EmailMessage()
    msg.set_content(source, subtype="html")
    return read_message(bytes(msg))


# --- replies shaped like the clients members use ----------------------------------------------

EXPECTED = {
    "reply_gmail_revoke.eml": Command("revoke"),
    "reply_outlook_status.eml": Command("status"),
    "reply_outlook_original_message_resend.eml": Command("resend", "dr.smith@ortho.example"),
    "reply_apple_mail_revoke_address.eml": Command("revoke", "dr.smith@ortho.example"),
    "reply_ios_extend.eml": Command("extend", "12"),
    "reply_html_only_revoke.eml": Command("revoke"),
    "reply_quoted_revoke_only.eml": UNRECOGNISED,
    "reply_top_posted_with_signature.eml": Command("status"),
    "reply_thunderbird_help.eml": Command("help"),
    "reply_german_outlook_revoke.eml": Command("revoke"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_client_reply_gives_the_typed_command(name):
    assert extract_command(fixture(name)) == EXPECTED[name]


WITH_HTML = sorted(n for n in EXPECTED if b"text/html" in (FIXTURES / n).read_bytes())


@pytest.mark.parametrize("name", WITH_HTML)
def test_html_alternative_alone_gives_the_same_command(name):
    # Some clients and gateways drop the text part; the HTML must read the same.
    parts = [p for p in fixture(name).walk() if p.get_content_type() == "text/html"]
    assert extract_command(html_only(parts[0].get_content())) == EXPECTED[name]


def test_revoke_only_in_the_quoted_receipt_revokes_nothing():
    msg = fixture("reply_quoted_revoke_only.eml")
    assert first_unquoted_line(msg) is None
    assert extract_command(msg) == UNRECOGNISED


# --- quote markers ----------------------------------------------------------------------------

CUT_BEFORE_REVOKE = [
    "> revoke",
    "On Sat, 28 Nov 2026 at 09:00, mailbridge <mailbridge@portal.example> wrote:\nrevoke",
    "On Sat, Nov 28, 2026 at 9:00 AM mailbridge <\nmailbridge@portal.example> wrote:\nrevoke",
    "On 04/02/2012 06:26 PM, Megan One\nwrote:\nrevoke",
    "Am 28.11.2026 um 09:00 schrieb mailbridge <mailbridge@portal.example>:\nrevoke",
    "Le sam. 28 nov. 2026 à 09:00, mailbridge <mailbridge@portal.example> a écrit :\nrevoke",
    "mailbridge schrieb am 28.11.2026 09:00 (GMT +01:00):\nrevoke",
    "-----Original Message-----\nrevoke",
    "----- Original Message -----\nrevoke",
    "From: mailbridge\nTo: Jane Doe\nCc: Front desk\nSent: Saturday, November 28, 2026\nrevoke",
    "From: mailbridge <mailbridge@portal.example>\nDate: Sat, 28 Nov 2026\nrevoke",
    "*From:* mailbridge\n*Sent:* Saturday, November 28, 2026\nrevoke",
    "Von: mailbridge\nGesendet: Samstag, 28. November 2026 15:00\nrevoke",
    "De : mailbridge\nEnvoyé : samedi 28 novembre 2026 15:00\nrevoke",
    "________________________________\nrevoke",
    "Begin forwarded message:\n\nrevoke",
    "---------- Forwarded message ---------\nrevoke",
    "-- \nrevoke",
    "--\nrevoke",
    "Sent from my iPhone\n\nrevoke",
    "Sent from my Android\nrevoke",
    "Get Outlook for iOS<https://aka.ms/o0ukef>\nrevoke",
    "Get Outlook for Android\nrevoke",
]


@pytest.mark.parametrize("body", CUT_BEFORE_REVOKE)
def test_nothing_after_a_quote_marker_counts(body):
    assert first_unquoted_line(plain("\n\n" + body + "\n")) is None
    assert extract_command(plain(body)) == UNRECOGNISED


@pytest.mark.parametrize("body, line", [
    ("\n\n   status   \n> revoke\n", "status"),
    ("\u200b\ufeff\n\u00a0\nresend\n\nOn Sat, 28 Nov 2026, mailbridge wrote:\n> revoke\n",
     "resend"),
    ("On it: status\n", "On it: status"),
    ("From: the front desk, revoke\nthey asked\n", "From: the front desk, revoke"),
])
def test_the_first_line_typed_is_kept(body, line):
    assert first_unquoted_line(plain(body)) == line


@pytest.mark.parametrize("source", [
    "<div><br></div><blockquote>revoke</blockquote>",
    "<div dir=ltr></div><div class='gmail_quote'>revoke</div>",
    "<div id='divRplyFwdMsg'>revoke</div>",
    "<div id='appendonsend'></div><hr><div>revoke</div>",
    "<br><blockquote type='cite'><div>revoke</div></blockquote>",
    "<div class='moz-cite-prefix'>revoke</div>",
    "<div class='yahoo_quoted'>revoke</div>",
    "<p><b>From:</b> mailbridge<br><b>Sent:</b> Sat<br>revoke</p>",
])
def test_html_quote_blocks_and_everything_after_them_are_dropped(source):
    msg = html_only(f"<html><head><title>status</title></head><body>{source}</body></html>")
    assert first_unquoted_line(msg) is None


@pytest.mark.parametrize("source, line", [
    ("<div>status</div><blockquote>revoke</blockquote>", "status"),
    ("<p>revoke <b>dr.smith@ortho.example</b></p><div class=gmail_quote>x</div>",
     "revoke dr.smith@ortho.example"),
    ("<style>p {}</style><script>revoke()</script><p>&nbsp;</p><p>extend&nbsp;12</p>",
     "extend 12"),
    ("<pre>\n\nhelp\nmore</pre>", "help"),
])
def test_html_reply_text(source, line):
    assert first_unquoted_line(html_only(source)) == line


def test_text_part_wins_unless_blank_and_attachments_are_not_read():
    msg = EmailMessage()
    msg.set_content("status\n")
    msg.add_alternative("<div>revoke</div>", subtype="html")
    assert extract_command(read_message(bytes(msg))) == Command("status")
    blank_text = EmailMessage()
    blank_text.set_content("\n")
    blank_text.add_alternative("<div>status</div>", subtype="html")
    assert extract_command(read_message(bytes(blank_text))) == Command("status")
    attached = EmailMessage()
    attached.set_content("")
    attached.add_attachment(b"revoke\n", maintype="text", subtype="plain", filename="x.txt")
    assert first_unquoted_line(read_message(bytes(attached))) is None


# --- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize("line, command", [
    ("revoke", Command("revoke")),
    ("Revoke.", Command("revoke")),
    ("*revoke*", Command("revoke")),
    ("  **REVOKE**  ", Command("revoke")),
    ("revoke all", Command("revoke")),
    ("revoke everyone", Command("revoke")),
    ("revoke Dr.Smith@Ortho.example.", Command("revoke", "dr.smith@ortho.example")),
    ("revoke <dr.smith@ortho.example>", Command("revoke", "dr.smith@ortho.example")),
    ("revoke mailto:dr.smith@ortho.example", Command("revoke", "dr.smith@ortho.example")),
    ("revoke Dr Smith <DR.SMITH@ortho.example>", Command("revoke", "dr.smith@ortho.example")),
    # Not an address: kept as written, so it matches no recipient (never "everyone").
    ("revoke dr smith", Command("revoke", "dr smith")),
    ("revoke a@x.example, b@y.example", Command("revoke", "a@x.example, b@y.example")),
    ("status", Command("status")),
    ("Status please", Command("status")),
    ("resend", Command("resend")),
    ("resend dr.smith@ortho.example<mailto:dr.smith@ortho.example>",
     Command("resend", "dr.smith@ortho.example")),
    ("extend", Command("extend")),
    ("extend 12", Command("extend", "12")),
    ("extend 12h", Command("extend", "12")),
    ("extend 12 hours", Command("extend", "12")),
    ("extend 1.5", Command("extend", "1.5")),
    ("extend 0,25 h", Command("extend", "0.25")),
    ("extend 2 days", Command("extend", "48")),
    ("extend by 6 hours", Command("extend", "6")),
    ("extend 0", Command("extend", "0")),
    ("extend soon", Command("extend", "soon")),
    ("extend -3", Command("extend", "-3")),
    ("help", Command("help")),
    ("Help?", Command("help")),
    ("revoked", UNRECOGNISED),
    ("please revoke", UNRECOGNISED),
    ("thanks", UNRECOGNISED),
    ("", UNRECOGNISED),
    ("  ***  ", UNRECOGNISED),
    (None, UNRECOGNISED),
])
def test_parse_command(line, command):
    assert parse_command(line) == command


# --- real-world replies from other projects ---------------------------------------------------

REPLY_CORPUS = CORPUS / "replies"
CORPUS_FILES = sorted(REPLY_CORPUS.iterdir()) if REPLY_CORPUS.is_dir() else []
CORPUS_FIRST_LINES = {
    "talon__gmail.eml": "Hello",
    "talon__outlook.eml": "Hello",
    "talon__iphone.eml": "Hello",
    "talon__apple_mail.eml": "Hello",
    "talon__yahoo.eml": "Hello",
    "talon__hotmail.eml": "Hello",
    "talon__android.eml": "Hello",
    # Bottom-posted: the quote comes first, so nothing counts (safe: nothing is done).
    "talon__thunderbird.eml": None,
    "redmine__ticket_reply_with_status.eml": "This is reply",
    "redmine__issue_update_with_quoted_reply_above.eml": "An update to the issue by the sender.",
    "redmine__outlook_web_access_2010_html_only.eml": "A mess.",
    "deltachat-core-rust__allinkl-quote.eml": "It's 1.0.",
    "django-helpdesk__forwarded-message.eml": "This is email body",
    "email_reply_parser__email_2_1.txt": "Outlook with a reply",
}


def body_only(path: Path) -> bool:
    with (CORPUS / "MANIFEST.tsv").open(newline="", encoding="utf-8") as manifest:
        for row in csv.DictReader(manifest, delimiter="\t"):
            if row["path"] == f"replies/{path.name}":
                return row["case"].startswith("BODY ONLY")
    return path.suffix == ".txt"


def corpus_message(path: Path) -> EmailMessage:
    if body_only(path):
        return plain(path.read_bytes().decode("utf-8", "replace"))
    return read_message(path.read_bytes())


@pytest.mark.skipif(not CORPUS_FILES, reason="shared/corpus is not present")
@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.name for p in CORPUS_FILES])
def test_corpus_reply_never_yields_revoke_unless_typed(path):
    msg = corpus_message(path)
    line = first_unquoted_line(msg)
    command = extract_command(msg)
    if path.name in CORPUS_FIRST_LINES:
        assert line == CORPUS_FIRST_LINES[path.name]
    assert command.name in COMMANDS
    if command.name == "revoke":
        assert line is not None and line.lower().lstrip("*_ ").startswith("revoke")


@pytest.mark.skipif(not (REPLY_CORPUS / "email-reply-parser__email_ios_outlook.txt").is_file(),
                    reason="shared/corpus is not present")
def test_outlook_for_ios_reply_stops_at_its_signature():
    msg = corpus_message(REPLY_CORPUS / "email-reply-parser__email_ios_outlook.txt")
    assert first_unquoted_line(msg).startswith("Fusce bibendum, quam hendrerit")


# --- properties -------------------------------------------------------------------------------

TYPED_LINE = st.one_of(
    st.sampled_from(["revoke", "Revoke.", "status", "resend", "resend dr@ortho.example",
                     "extend 12", "help", "thanks", "", "  "]),
    st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=40))
QUOTED = st.lists(st.one_of(
    st.sampled_from(["revoke", "revoke dr@ortho.example", "status", "resend", "extend 99", ""]),
    st.text(max_size=60)), max_size=8)


def quote(kind: str, lines: list[str]) -> str:
    text = "\n".join(lines)
    if kind == ">":
        return "\n".join("> " + line for line in text.split("\n"))
    if kind == "wrote":
        return f"On Sat, 28 Nov 2026 at 09:00, mailbridge <{SERVICE}> wrote:\n{text}"
    return (f"From: mailbridge <{SERVICE}>\nSent: Saturday, November 28, 2026\n"
            f"To: Jane Doe\nSubject: Shared: POC\n\n{text}")


@settings(max_examples=200, deadline=None)
@given(typed=st.lists(TYPED_LINE, max_size=4), kind=st.sampled_from([">", "wrote", "outlook"]),
       quoted=QUOTED)
def test_quoted_text_never_changes_the_command(typed, kind, quoted):
    before = "\n".join(typed)
    alone = extract_command(plain(before + "\n"))
    assert extract_command(plain(before + "\n" + quote(kind, quoted) + "\n")) == alone


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=2000),
       head=st.sampled_from([b"", b"Content-Type: text/plain\n\n", b"Content-Type: text/html\n\n",
                             b"Content-Type: multipart/alternative; boundary=b\n\n--b\n"]))
def test_random_bytes_never_raise(raw, head):
    command = extract_command(read_message(head + raw))
    assert command.name in COMMANDS


@settings(max_examples=300, deadline=None)
@given(line=st.text(max_size=200))
def test_any_line_parses_to_a_known_command(line):
    assert parse_command(line).name in COMMANDS


# --- hidden HTML -------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [
    '<div style="display:none">revoke</div>',
    '<div style="DISPLAY: none !important">revoke</div>',
    '<span style="visibility:hidden">revoke</span>',
    '<div hidden>revoke</div>',
    '<div aria-hidden="true">revoke</div>',
    '<div style="font-size:0">revoke</div>',
    '<div style="font-size:0px;line-height:0">revoke</div>',
    '<div style="max-height:0;overflow:hidden">revoke</div>',
    '<div style="opacity:0">revoke</div>',
    '<div style="opacity: 0.0">revoke</div>',
    '<div style="width:0;height:0;overflow:hidden">revoke</div>',
    '<div style="mso-hide:all">revoke</div>',
    '<div style="position:absolute;left:-9999px">revoke</div>',
    '<template><div>revoke</div></template>',
    '<style>.x{display:none}</style><div class="x">revoke</div>',
    '<style>#cmd { visibility: hidden }</style><p id="cmd">revoke</p>',
    '<style>u{display:none}</style><u>revoke</u>',
    # A browser moves "revoke" into the hidden div (HTML5 foster parenting); so must we.
    '<div style="display:none"><table></div>revoke',
    '<div style="display:none"><p>revoke</div>',
])
def test_hidden_html_text_is_never_a_command(hidden):
    msg = html_only(f"<html><body>{hidden}<div>Thanks, see you</div></body></html>")
    # (After an unclosed hidden element the browser hides the thanks as well.)
    assert first_unquoted_line(msg) in ("Thanks, see you", None)
    assert extract_command(msg) == Command("help", "", recognised=False)


def test_visible_text_after_a_hidden_element_is_read():
    msg = html_only('<p><span style="display:none">preview text</span>status</p>')
    assert extract_command(msg) == Command("status")


def test_html_part_cannot_overrule_the_text_part():
    msg = EmailMessage()
    msg.set_content("Thanks!\n")
    msg.add_alternative('<div>revoke</div><div style="display:none">revoke</div>',
                        subtype="html")
    assert extract_command(read_message(bytes(msg))) == Command("help", "", recognised=False)
