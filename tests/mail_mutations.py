"""Damage a real message the way hostile or broken mail is damaged: byte flips, deletions,
splices between messages, truncation, stray MIME boundaries, encoded-word and header
fragments. One `random.Random` drives every choice, so atheris (through a seed it mutates)
and Hypothesis (through `st.randoms`, which it can shrink) share the same mutations.
"""

from __future__ import annotations

import random
import re

# Pieces of the grammar the readers parse, whole and broken: what a byte-flipper rarely makes.
FRAGMENTS: tuple[bytes, ...] = (
    b"=?utf-8?q?", b"=?UTF-8?B?", b"?=", b"=?utf\x008?q?x?=", b"=?iso-2022-jp?b?GyRCJCIbKEI=?=",
    b"=?x-unknown?q?a=FF?=", b"=?utf-8*en?Q?caf=C3=A9?=", b"=?unicode-escape?q?\\ud800?=",
    b"=?utf-7?q?+2AA-?=", b"=?idna?q?xn--?=", b"=?rot13?q?a?=", b"=?utf-8?b?////?=",
    b'; charset="utf\x008"', b"; charset=utf-7", b"; charset=unicode_escape", b"; charset=idna",
    b"; charset=base64", b"; charset*=''", b"; charset*=utf-8''%FF", b"; format=flowed",
    b"; name*0*=utf-8''%E2%80%AE; name*1=.pdf", b"; filename*=x'y'%00", b'; filename="a\\',
    b"; boundary=", b'; boundary=""', b"; boundary=--", b"\r\n\t", b"\n ", b"\x00", b"\xff\xfe",
    b"\xed\xa0\x80", b"\xc3", b"\r", b"%PDF-1.4\n", b"PK\x03\x04",
    b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",
    b"Content-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\n",
    b"Content-Type: message/rfc822\r\n", b"Content-Type: multipart/report; "
    b"report-type=delivery-status\r\n", b"Content-Type: message/global-delivery-status\r\n",
    b"Content-Type: text/html; charset=utf-8\r\n", b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n", b"Content-Disposition: attachment\r\n",
    b"Authentication-Results: mx.portal.example; dkim=pass header.d=riverside-pt.example\r\n",
    b"Authentication-Results: mx.portal.example; dmarc=pass header.from=\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=riverside-pt.example; s=s; h=from; bh=; b=\r\n",
    b"Action: failed\r\nFinal-Recipient: rfc822; ", b"Status: 5.1.1\r\n",
    b"X-Failed-Recipients: ", b"From: ", b"From: \"a@b.example\" <jane@riverside-pt.example>\r\n",
    b"To: ", b"To: dr.smith@ortho.example\r\n", b"Subject: ", b"Message-ID: <",
    b"<html><body><div style=\"display:none\">", b"</div></body></html>", b"<!--", b"<style>",
    b"<blockquote>", b"cid:", b"On Mon, Jan 1, 2024 at 9:00 AM Jane <j@x.example> wrote:",
    b"revoke ", b"extend 1e999999", b"> ", b"-- \r\n", b"=\r\n", b"=FF", b"&#0;", b"&#xD800;",
)
_LINE_START = re.compile(rb"(?<=\n)")
_BOUNDARY = re.compile(rb'boundary="?([^";\r\n]{1,80})', re.IGNORECASE)
MAX_STEPS = 6


def mutate(data: bytes, rng: random.Random, others: list[bytes], max_size: int) -> bytes:
    """`data` with one to MAX_STEPS damages applied, at most `max_size` bytes long."""
    out = bytearray(data)
    for _ in range(rng.randint(1, MAX_STEPS)):
        step = rng.choice(_STEPS)
        out = bytearray(step(bytes(out), rng, others))
    return bytes(out[:max_size])


def _position(data: bytes, rng: random.Random) -> int:
    """Half the time the start of a line (where headers and boundaries live), else anywhere."""
    if data and rng.random() < 0.5:
        starts = [0] + [m.start() for m in _LINE_START.finditer(data, 0, 1 << 16)]
        return rng.choice(starts)
    return rng.randint(0, len(data))


def flip(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(len(out))
        out[at] = rng.randrange(256) if rng.random() < 0.5 else out[at] ^ (1 << rng.randrange(8))
    return bytes(out)


def delete(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    at = _position(data, rng)
    return data[:at] + data[at + rng.randint(1, 256):]


def duplicate(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    start = _position(data, rng)
    piece = data[start:start + rng.randint(1, 512)]
    at = _position(data, rng)
    return data[:at] + piece * rng.randint(1, 3) + data[at:]


def truncate(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    return data[:_position(data, rng)]


def splice(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    """The start of this message and the rest of another (or a piece of it inserted)."""
    if not others:
        return data
    other = rng.choice(others)
    if rng.random() < 0.5:
        return data[:_position(data, rng)] + other[_position(other, rng):]
    start = _position(other, rng)
    at = _position(data, rng)
    return data[:at] + other[start:start + rng.randint(1, 2048)] + data[at:]


def boundary(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    """A boundary line of one of the message's own multiparts, opening or closing."""
    names = _BOUNDARY.findall(data[:1 << 16]) or [b"zz"]
    line = b"--" + rng.choice(names) + (b"--" if rng.random() < 0.3 else b"")
    line += rng.choice((b"\r\n", b"\n", b"\r\n\r\n", b""))
    at = _position(data, rng)
    return data[:at] + line + data[at:]


def fragment(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    at = _position(data, rng)
    return data[:at] + rng.choice(FRAGMENTS) + data[at:]


def header_break(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    """A line ending swapped: headers run into bodies, folds break, CR stands alone."""
    ends = [m.start() for m in re.finditer(rb"\r?\n", data[:1 << 16])]
    if not ends:
        return data
    at = rng.choice(ends)
    width = 2 if data[at:at + 2] == b"\r\n" else 1
    return data[:at] + rng.choice((b"", b"\r", b"\n\n", b"\r\n ", b"\n\t", b"\r\n\r\n")) + \
        data[at + width:]


_STEPS = (flip, delete, duplicate, truncate, splice, splice, boundary, boundary, fragment,
          fragment, fragment, header_break)
