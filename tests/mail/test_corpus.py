"""Real-world messages from other projects' test suites: parsing never crashes, and the hard
cases (odd file names, forwards, Outlook rich text) come out right.

The corpus lives beside the repository (../shared/corpus) and is never copied into it.
"""

from __future__ import annotations

import unicodedata

import pytest

from mailbridge.config import load_settings
from mailbridge.mail import mime, recipients, request
from mailbridge.mail.filetypes import sanitise_filename
from mailbridge.outcomes import Reject
from mailbridge.settings import Settings
from tests.conftest import CORPUS

SHARE = "share@portal.example"
PLUS = "share+dr.smith=ortho.example@portal.example"
FILES = sorted(p for p in CORPUS.rglob("*")
               if p.is_file() and p.name not in ("MANIFEST.tsv", "SOURCES.tsv", "README.md"))

pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason="shared/corpus is not present")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Settings:
    return load_settings(None, env={
        "MAILBRIDGE_SERVICE_BASE_URL": "http://localhost:8080",
        "MAILBRIDGE_ADDRESSES_SHARING": SHARE,
        "MAILBRIDGE_ADDRESSES_REPLY_DOMAIN": "reply.portal.example",
        "MAILBRIDGE_OUTBOUND_FROM": "mailbridge@portal.example",
        "MAILBRIDGE_SERVICE_DATA_DIR": str(tmp_path_factory.mktemp("data")),
    })


def read(relative: str):
    path = CORPUS / relative
    if not path.is_file():
        pytest.skip(f"{relative} is not in the corpus")
    return mime.read_message(path.read_bytes())


def shared(relative: str, cfg: Settings):
    """parse_share with a plus-address recipient, so the attachment checks are reached."""
    return request.parse_share(read(relative), [PLUS], cfg)


def names(result) -> list[tuple[str, str]]:
    assert isinstance(result, request.ParsedShare), result
    return [(a.filename, a.kind) for a in result.attachments]


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(CORPUS)) for p in FILES])
def test_every_corpus_message_gives_a_share_or_a_reject(cfg, path):
    msg = mime.read_message(path.read_bytes())
    for envelope in ([SHARE], [PLUS]):
        result = request.parse_share(msg, envelope, cfg)
        assert isinstance(result, request.ParsedShare | Reject)
        if isinstance(result, request.ParsedShare):
            assert result.recipients and result.attachments
            assert len(result.title) <= request.MAX_TITLE_CHARS
            assert "<script" not in result.note_html.lower()


def test_path_traversal_name_keeps_only_the_last_component():
    msg = read("filenames/php-mime-mail-parser__m0027")
    assert mime.part_filename(msg) == "1234/../../1234.txt"
    assert sanitise_filename(mime.part_filename(msg), "txt", 1) == "1234.txt"


def test_rfc2231_continuation_utf8_japanese_name(cfg):
    assert names(shared("filenames/mail__japanese_attachment_long_name.eml", cfg)) == [
        ("かきくけこ" * 5 + ".txt", "txt")]


def test_rfc2231_continuation_iso_2022_jp_name_mixing_encoded_and_plain_segments(cfg):
    assert names(shared("filenames/rt__rfc2231-attachment-filename-continuations", cfg)) == [
        ("新しいテキスト ドキュメント.txt", "txt")]


def test_rfc2231_continuation_with_decomposed_umlauts_becomes_nfc(cfg):
    [(name, kind)] = names(shared("filenames/deltachat-core-rust__pdf_filename_continuation.eml",
                                  cfg))
    assert (name, kind) == ("test pdf äöüß.pdf", "pdf")
    assert unicodedata.is_normalized("NFC", name)


def test_unquoted_encoded_word_name_is_decoded(cfg):
    # The payload claims to be a PDF but is an S/MIME blob: refused, under its decoded name.
    result = shared("filenames/mail__attachment_with_base64_encoded_name.eml", cfg)
    assert (result.code, result.details["filename"]) == ("disallowed_type", "This is a test.pdf")


def test_raw_utf8_name_cut_mid_character_stays_readable(cfg):
    [(name, kind)] = names(shared("filenames/flanker__russian-attachment-yahoo.eml", cfg))
    assert name.startswith("Картинка с очень, очень длинным") and kind == "png"


@pytest.mark.parametrize(("relative", "expected"), [
    ("filenames/deltachat-core-rust__jpeg-as-application-octet-stream.eml",
     [("rusty_deltachat_logo.jpeg", "jpeg")]),
    ("filenames/mail-parser__mail_test_10", [("Move To Eight ZWEP6227F.pdf", "pdf")]),
    ("filenames/enmime__mime-blank-media-name.raw", [("Invoice_302232133150612.pdf", "pdf")]),
    ("filenames/php-mime-mail-parser__m0024", [("Biodiversité de semaine en semaine.doc", "doc")]),
])
def test_type_is_taken_from_content_not_from_the_declared_type(cfg, relative, expected):
    assert names(shared(relative, cfg)) == expected


def test_pdf_inside_a_forwarded_message_is_found(cfg):
    assert names(shared("forward/mail__attachment_message_rfc822.eml", cfg)) == [
        ("broken.pdf", "pdf")]


@pytest.mark.parametrize("relative", ["forward/mail__raw_email2.eml",
                                      "forward/rt__outlook-rfc822",
                                      "forward/discourse__attached_eml_file.eml"])
def test_signatures_and_forwarded_wrappers_are_not_documents(cfg, relative):
    assert shared(relative, cfg).code == "no_attachments"


@pytest.mark.parametrize("relative", ["tnef/MimeKit__rich-text.eml", "tnef/MimeKit__ukr.eml",
                                      "tnef/mail-mime-parser__m4006.txt"])
def test_outlook_rich_text_messages_are_refused_as_tnef(cfg, relative):
    assert shared(relative, cfg).code == "tnef"


def test_broken_base64_attachment_is_unreadable(cfg):
    result = shared("malformed/enmime__malformed-base64-attach.raw", cfg)
    assert (result.code, result.details) == ("unreadable_attachment", {"filename": "some.doc"})


@pytest.mark.parametrize("relative", [
    "forward/email-forward-parser__gmail_en_body.txt",
    "forward/email-forward-parser__apple_mail_en_body.txt",
    "forward/email-forward-parser__new_outlook_2019_en_body.txt",
    "replies/email_reply_parser__email_2_1.txt",
    "replies/email-reply-parser__email_ios_outlook.txt",
])
def test_forwarded_header_blocks_never_give_recipients(cfg, relative):
    path = CORPUS / relative
    if not path.is_file():
        pytest.skip(f"{relative} is not in the corpus")
    # These are bodies only: send them the way a member's client would.
    raw = b"Subject: Fwd\nContent-Type: text/plain; charset=utf-8\n\n" + path.read_bytes()
    result = recipients.find_recipients(mime.read_message(raw), [SHARE], cfg)
    assert result.code == "no_recipients"
