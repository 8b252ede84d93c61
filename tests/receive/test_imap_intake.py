"""Which of our addresses a mailbox message was for (IMAP has no SMTP envelope), and which
messages are unreadable — the parts of IMAP intake that need no server."""

from __future__ import annotations

from email.parser import BytesHeaderParser
from email.policy import default

import pytest

from mailbridge.receive.imap_intake import envelope_to, unreadable
from tests.conftest import SHARING, make_settings


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path / "data")


def headers(text: str):
    return BytesHeaderParser(policy=default).parsebytes(text.encode() + b"\r\n\r\nbody\r\n")


def test_a_reply_delivered_to_the_mailbox_routes_by_its_reply_address(settings):
    key_address = "reply+" + "a" * 40 + "@reply.portal.example"
    message = headers(f"From: jane.doe@clinic.example\r\nTo: Mailbridge <{key_address}>\r\n"
                      f"Cc: someone@else.example")
    assert envelope_to(message, settings) == [key_address]


def test_delivery_headers_and_plus_addresses_are_kept_and_others_dropped(settings):
    message = headers("Delivered-To: share@portal.example\r\n"
                      "To: Dr Smith <share+dr.smith=ortho.example@portal.example>, "
                      "colleague@clinic.example\r\nCc: SHARE@portal.example")
    assert envelope_to(message, settings) == ["share@portal.example",
                                              "share+dr.smith=ortho.example@portal.example"]


def test_without_any_of_our_addresses_the_sharing_address_stands_in(settings):
    # e.g. the clinic Bcc'd the mailbox, or a provider alias delivered it
    message = headers("From: jane.doe@clinic.example\r\nTo: dr.smith@ortho.example")
    assert envelope_to(message, settings) == [SHARING]
    assert envelope_to(headers("To: =?utf-8?q?broken"), settings) == [SHARING]


@pytest.mark.parametrize("raw,reason", [
    (b"", "empty"),
    (b"\r\n\r\n", "empty"),
    (b"just a line of text\r\nand another\r\n", "no header fields"),
])
def test_unreadable_messages_say_why(raw, reason):
    assert reason in unreadable(raw)


def test_an_ordinary_message_is_readable():
    assert unreadable(b"From: a@b.example\r\nSubject: hi\r\n\r\nbody\r\n") == ""
