"""What identifies a message whatever a relay or a replay does to it: the keys a replay
cannot change without breaking its signature (its Message-ID and the DKIM signatures it
carries), and the dedupe key of a share (Message-ID + the relaxed-canonical body). A resent
`resend` with one more space at the end (DKIM relaxed still verifies) has the same keys.
Pure; `store.seen` remembers the keys of what was acted on.
"""

from __future__ import annotations

import hashlib
import re
from email.message import EmailMessage

from dkim.util import InvalidTagValueList, parse_tag_value

from mailbridge.mail.mime import header_end, header_text

_SLICE = 1 << 20
_WSP_RUN = re.compile(rb"[ \t]+")


def message_keys(raw: bytes, message: EmailMessage) -> list[str]:
    """The Message-ID (or, without one, the relaxed body with Date and Subject) and every
    DKIM signature value, each hashed to a fixed length."""
    keys = []
    message_id = _header(message, "Message-ID")
    if message_id:
        keys.append("mid:" + _digest(message_id.encode("utf-8", "replace")))
    else:
        digest = relaxed_body_digest(raw)
        for name in ("Date", "Subject"):
            digest.update(b"\0" + _header(message, name).encode("utf-8", "replace"))
        keys.append("body:" + digest.hexdigest())
    keys.extend("sig:" + _digest(value) for value in _signature_values(message))
    return list(dict.fromkeys(keys))


def message_id(message: EmailMessage) -> str | None:
    """The Message-ID to quote in our answer's In-Reply-To and References: one `<id>` of
    printable ASCII, else None. Read through mime.header_text, as the stdlib's own reading
    raises on some hostile values (an encoded-word decoding to a lone surrogate); none with
    `=?` in it, which the stdlib would decode as an encoded-word when we write it out."""
    text = header_text(message, "Message-ID").strip()
    return text if _MESSAGE_ID.fullmatch(text) and "=?" not in text else None


_MESSAGE_ID = re.compile(r"<[!-;=?-~]{1,900}>")


def share_dedupe_key(raw: bytes, message: EmailMessage) -> str:
    """Message-ID plus the relaxed-canonical body (RFC 6376 3.4.4): the same message arriving
    again (SMTP retry, IMAP re-poll, a replay with whitespace changed) matches even when relays
    added trace headers or re-wrapped line ends on the way."""
    digest = hashlib.sha256(_header(message, "Message-ID").encode("utf-8", "replace") + b"\0")
    digest.update(relaxed_body_digest(raw).digest())
    return digest.hexdigest()


def relaxed_body_digest(raw: bytes):
    """SHA-256 of the body as DKIM's relaxed canonicalization sees it: runs of spaces and tabs
    are one space, none at a line's end, no empty lines at the end, LF or CRLF alike. Worked in
    slices, so a large message is not copied whole."""
    position = header_end(raw)
    view = memoryview(raw)
    digest = hashlib.sha256()
    written = False
    pending = 0  # line ends not written yet: they count only if more content follows
    carry = b""
    while True:
        chunk = bytes(view[position:position + _SLICE])
        position += len(chunk)
        data, final = carry + chunk, position >= len(raw)
        if final:
            carry = b""
        else:
            # Cut after a line end (or, in a very long line, before trailing blanks) so no
            # run of blanks or CRLF is split between two slices.
            cut = data.rfind(b"\n") + 1 or len(data.rstrip(b" \t\r"))
            data, carry = data[:cut], data[cut:]
        text = _canonical_lines(data)
        if final:
            text = text.rstrip(b" \r")
        content = text.rstrip(b"\n")
        if content:
            digest.update(b"\n" * pending + content)
            written, pending = True, len(text) - len(content)
        else:
            pending += len(text)
        if final:
            break
    if written:
        digest.update(b"\n")
    return digest


def _canonical_lines(data: bytes) -> bytes:
    """Runs of blanks as one space, none before a line end, CRLF as LF. The same as the
    regular expressions `[ \t]+` -> " " then ` ?\r?\n` -> LF, done with bytes.replace where
    it can: the regex over a base64 body was most of a share's time in the worker."""
    if b"\t" in data or b"  " in data:
        data = _WSP_RUN.sub(b" ", data)
    return data.replace(b"\r\n", b"\n").replace(b" \n", b"\n")


def _digest(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()


def _header(message: EmailMessage, name: str) -> str:
    try:
        value = message.get(name)
    except Exception:  # noqa: BLE001 - hostile headers can trip the stdlib's parser
        return ""
    return " ".join(str(value).split()) if value is not None else ""


def _signature_values(message: EmailMessage) -> list[bytes]:
    try:
        fields = [str(value) for name, value in message.raw_items()
                  if name.lower() == "dkim-signature"]
    except Exception:  # noqa: BLE001
        return []
    values = []
    for field in fields:
        try:
            tags = parse_tag_value(re.sub(r"\s+", "", field).encode("utf-8", "replace"))
        except (InvalidTagValueList, ValueError):
            continue
        if tags.get(b"b"):
            values.append(tags[b"b"])
    return values
