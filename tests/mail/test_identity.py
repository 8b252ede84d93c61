"""What identifies a message: the Message-ID we may quote back, whatever the field holds."""

from __future__ import annotations

import pytest

from mailbridge.mail import identity, mime


def with_message_id(value: bytes):
    return mime.read_message(b"From: jane@riverside-pt.example\r\nMessage-ID: " + value
                             + b"\r\nSubject: Plan\r\n\r\nTo: dr.smith@ortho.example\r\n")


def test_a_well_formed_message_id_is_quoted_as_written():
    assert identity.message_id(with_message_id(b"<CAF=x+1@mail.gmail.com>")) == \
        "<CAF=x+1@mail.gmail.com>"


@pytest.mark.parametrize("value", [b"<a@b>\r\n\tX-Injected: 1", b"<a@b> <c@d>"])
def test_only_the_first_id_of_the_field_is_quoted(value):
    assert identity.message_id(with_message_id(value)) == "<a@b>"


@pytest.mark.parametrize("value", [
    b"=?utf-7?q?+2AA-?=",  # the stdlib raised reading it
    b"<caf\xc3\xa9@x.example>", b"no brackets@x.example", b"<>", b"",
])
def test_anything_else_is_no_message_id_to_quote(value):
    assert identity.message_id(with_message_id(value)) is None
