"""The dedupe key's body digest is DKIM's relaxed body canonicalization (RFC 6376 3.4.4),
checked against dkimpy's own on messy whitespace, so a replay with blanks changed still
matches and a changed body does not; the Message-ID we may quote back, whatever the field
holds."""

from __future__ import annotations

import hashlib

import pytest
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.mail import identity, mime
from mailbridge.mail.identity import relaxed_body_digest

HEADER = b"From: a@example.org\r\nSubject: x\r\n\r\n"


def dkim_relaxed(body: bytes) -> str:
    canonical = Relaxed.canonicalize_body(body)
    return hashlib.sha256(canonical.replace(b"\r\n", b"\n")).hexdigest()


lines = st.lists(st.text(alphabet=" \tab\r", max_size=12).map(str.encode), max_size=12)


@settings(max_examples=300, deadline=None)
@given(lines)
def test_body_digest_is_dkim_relaxed(body_lines):
    body = b"".join(line.replace(b"\r", b"") + b"\r\n" for line in body_lines)
    assert relaxed_body_digest(HEADER + body).hexdigest() == dkim_relaxed(body)


def test_blank_changes_match_and_content_changes_do_not():
    base = relaxed_body_digest(HEADER + b"To: dr@x.example\r\n\r\nQkFTRTY0\r\n").hexdigest()
    spaced = relaxed_body_digest(HEADER + b"To:  dr@x.example \r\n\r\nQkFTRTY0\r\n\r\n")
    lf = relaxed_body_digest(HEADER.replace(b"\r\n", b"\n") + b"To: dr@x.example\n\nQkFTRTY0\n")
    other = relaxed_body_digest(HEADER + b"To: dr@x.example\r\n\r\nQkFTRTY1\r\n")
    assert spaced.hexdigest() == base and lf.hexdigest() == base
    assert other.hexdigest() != base


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
    b"<0e2b9-=??q?a=FF?=1f@sunrise-pt.example>",  # decoded as an encoded-word when written
])
def test_anything_else_is_no_message_id_to_quote(value):
    assert identity.message_id(with_message_id(value)) is None
