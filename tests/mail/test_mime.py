"""Defensive MIME reading: same results as the standard library, without its copies."""

from __future__ import annotations

import os
import tracemalloc

import pytest

from mailbridge.mail import mime, request
from tests.conftest import MAIL, make_settings
from tests.helpers import share_message, wire


def attachment_part(message):
    return next(p for p in message.walk() if p.get_filename())


def test_base64_attachment_decodes_exactly_like_the_standard_library():
    data = b"%PDF-1.4\n" + os.urandom(300_000)
    msg = mime.read_message(wire(share_message(attachments=[("scan.pdf", data)])))
    part = attachment_part(msg)
    assert mime.payload(part) == part.get_payload(decode=True) == data


def test_damaged_base64_still_counts_as_unreadable():
    raw = wire(share_message(attachments=[("scan.pdf", b"%PDF-1.4\n" + os.urandom(3000))]))
    damaged = raw.replace(b"JVBERi0xLjQK", b"JVBER!*0xLjQK", 1)  # "%PDF-1.4\n" in base64
    assert damaged != raw
    part = attachment_part(mime.read_message(damaged))
    assert mime.payload(part) is None


def test_a_large_attachment_is_not_copied_over_and_over(tmp_path):
    size = 10 * 1024 * 1024
    raw = wire(share_message(attachments=[("big.pdf", b"%PDF-1.4\n" + os.urandom(size))]))
    settings = make_settings(tmp_path)
    tracemalloc.start()
    try:
        message = mime.read_message(raw)
        parsed = request.parse_share(message, ["share@portal.example"], settings)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert parsed.attachments[0].data[:8] == b"%PDF-1.4"
    # The message as text (4/3 of the file) plus the decoded file, with room to spare —
    # the standard library's own path needed more than ten times the file.
    assert peak < 5 * size, f"peak {peak / size:.1f} times the attachment"


def test_a_nul_inside_the_charset_name_still_gives_the_share(tmp_path):
    # charset="utf\x008" made bytes.decode raise ValueError: the message was parked as failed
    # and the member never heard why. An unusable charset name reads as UTF-8 instead.
    raw = (MAIL / "charset_with_nul_byte.eml").read_bytes()
    parsed = request.parse_share(mime.read_message(raw), ["share@portal.example"],
                                 make_settings(tmp_path))
    assert isinstance(parsed, request.ParsedShare), parsed
    assert parsed.recipients == ["dr.smith@ortho.example"]
    assert "café notes" in parsed.note_html
    assert [a.filename for a in parsed.attachments] == ["plan.pdf"]


@pytest.mark.parametrize("name, codec", [
    ("UTF-8", "utf-8"), (" utf8 ", "utf-8"), ("ISO-8859-1", "iso8859-1"),
    ("windows-1252", "cp1252"), ("Shift_JIS", "shift_jis"), ("us-ascii", "ascii"),
    ("utf\x008", None), ("x-unknown", None), ("", None), ("utf-8\ud800", None),
    # Names Python knows that are no charset of mail: transforms, escapes, IDNA, "undefined".
    ("rot13", None), ("base64", None), ("hex", None), ("zip", None), ("unicode_escape", None),
    ("raw-unicode-escape", None), ("idna", None), ("punycode", None), ("undefined", None),
    ("x" * 200, None),
])
def test_a_charset_name_is_a_usable_codec_or_none(name, codec):
    assert mime.codec_name(name) == codec


def test_utf7_that_decodes_to_lone_surrogates_still_gives_text_that_can_be_stored(tmp_path):
    # UTF-7 "+2AA-" decodes to a lone surrogate; sealing such a title, note or file name as
    # UTF-8 raised and parked the message as failed. It now reads as U+FFFD.
    pdf = b"JVBERi0xLjQKJSVFT0YK\n"
    raw = (b"From: Jane <jane@riverside-pt.example>\nTo: share@portal.example\n"
           b"Subject: =?utf-7?q?Plan_+2AA-?=\nMIME-Version: 1.0\n"
           b"Content-Type: multipart/mixed; boundary=b\n\n"
           b"--b\nContent-Type: text/plain; charset=utf-7\n\n"
           b"To: dr.smith@ortho.example\n\nNotes +2AA- inside\n"
           b"--b\nContent-Type: application/pdf\nContent-ID: <=?utf-7?q?+2AA-?=>\n"
           b"Content-Disposition: attachment; filename*=utf-7''scan+2AA-.pdf\n"
           b"Content-Transfer-Encoding: base64\n\n" + pdf + b"--b--\n")
    msg = mime.read_message(raw)
    body, document = msg.get_payload()
    texts = [mime.header_text(msg, "Subject"), mime.part_text(body),
             mime.part_filename(document), mime.header_text(document, "Content-ID")]
    assert texts[:3] == ["Plan \ufffd", "To: dr.smith@ortho.example\n\nNotes \ufffd inside",
                         "scan\ufffd.pdf"]
    assert "\ufffd" in texts[3]
    for text in texts:
        text.encode("utf-8")
    parsed = request.parse_share(msg, ["share@portal.example"], make_settings(tmp_path))
    assert "Notes \ufffd inside" in parsed.note_html
    parsed.note_html.encode("utf-8")


def test_a_nul_in_the_charset_of_a_forwarded_message_still_gives_the_share(tmp_path):
    # Message.get_payload() decodes 8-bit text with the charset the part names, unchecked:
    # reading the enclosed message of a forward raised ValueError.
    raw = (MAIL / "charset_with_nul_byte.eml").read_bytes().replace(
        b"--b1--", b"--b1\r\nContent-Type: message/rfc822\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        b"Content-Type: text/plain; charset=\"utf\x008\"\r\n\r\nforwarded caf\xc3\xa9\r\n--b1--")
    msg = mime.read_message(raw)
    assert [mime.content_type(p) for p in mime.children(msg)] == [
        "text/plain", "application/pdf", "message/rfc822"]
    parsed = request.parse_share(msg, ["share@portal.example"], make_settings(tmp_path))
    assert [a.filename for a in parsed.attachments] == ["plan.pdf"]
