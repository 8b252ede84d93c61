"""Reads untrusted MIME defensively: the message, header text, part names, bodies and children.

Nothing here raises on a malformed message; the worst case is an empty value.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email
import email.errors
import email.feedparser
import email.header
import email.message
import email.parser
import email.policy
import re

_BROKEN_BASE64 = (email.errors.InvalidBase64CharactersDefect,
                  email.errors.InvalidBase64LengthDefect)


class NestedTooDeeply(email.errors.MessageDefect):
    """The parser gave up on the MIME nesting; only the top headers were read."""


def read_message(raw: bytes) -> email.message.EmailMessage:
    """Parse `raw` with the modern policy; never raises (worst case: headers only, or empty)."""
    try:
        return _parse_in_slices(raw)
    except RecursionError:
        defect: email.errors.MessageDefect = NestedTooDeeply()
    except Exception as exc:  # noqa: BLE001 - the stdlib parser has crash bugs on hostile input
        defect = email.errors.MessageDefect(type(exc).__name__)
    try:
        msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(
            raw, headersonly=True)
    except Exception:  # noqa: BLE001
        msg = email.message.EmailMessage()
    msg.defects.append(defect)
    return msg


def _parse_in_slices(raw: bytes) -> email.message.EmailMessage:
    """The same parse as `email.message_from_bytes`, fed in slices: that function copies the
    whole message into a str and then into a StringIO (four bytes a character), which for a
    35 MB message meant a quarter of a gigabyte at once."""
    parser = email.feedparser.BytesFeedParser(policy=email.policy.default)
    view = memoryview(raw)
    for start in range(0, len(raw), _SLICE):
        parser.feed(bytes(view[start:start + _SLICE]))
    return parser.close()


_SLICE = 1 << 20


def header_end(raw: bytes) -> int:
    """Where the body of `raw` starts: after the first empty line (CRLF or LF), else the end."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := raw.find(sep)) >= 0]
    return min(ends, default=len(raw))


# --- headers ---------------------------------------------------------------------------------


def header_text(part: email.message.Message, name: str) -> str:
    """A header's decoded text; falls back to the raw bytes when the parser chokes or loses them."""
    try:
        value = part.get(name)
        text = "" if value is None else str(value)
    except Exception:  # noqa: BLE001 - header parsing bugs on hostile input
        text = "\ufffd"
    if "\ufffd" in text or "=?" in text:
        raw = _raw_header(part, name)
        if raw is not None:
            return storable(_decode_words(raw))
    return storable(text)


def _raw_header(part: email.message.Message, name: str) -> str | None:
    """The header as received, unfolded, with 8-bit bytes read as UTF-8 (else Windows-1252)."""
    for key, value in part.raw_items():
        if key.lower() == name.lower() and isinstance(value, str):
            return re.sub(r"\r?\n(?=[ \t])", "", _undo_surrogates(value))
    return None


def _undo_surrogates(text: str) -> str:
    # The bytes parser keeps undecodable 8-bit header bytes as lone surrogates.
    try:
        data = text.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return text
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        as_utf8 = data.decode("utf-8", "replace")
    broken = as_utf8.count("\ufffd")
    # Mostly-valid UTF-8 (a name cut mid-character) stays UTF-8; else a legacy 8-bit charset.
    if sum(1 for ch in as_utf8 if ord(ch) > 127) > 2 * broken:
        return as_utf8
    return data.decode("cp1252", "replace")


def _decode_words(text: str) -> str:
    """Decode RFC 2047 encoded-words, also unquoted ones where the standard forbids them."""
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except Exception:  # noqa: BLE001 - unknown charsets, broken words: keep the text as is
        return text


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str) -> str:
    """`text` with lone surrogates as U+FFFD. Decoders make them of broken input (UTF-7's
    "+2AA-", 8-bit bytes kept by the parser): text handed on is stored and mailed as UTF-8,
    which has no place for them. Every text mime hands out passes through here."""
    if _LONE_SURROGATE.search(text) is None:
        return text
    return _LONE_SURROGATE.sub("\ufffd", text)


def content_type(part: email.message.Message) -> str:
    try:
        return part.get_content_type()
    except Exception:  # noqa: BLE001 - RFC 2045: an unreadable Content-Type means text/plain
        return "text/plain"


def _disposition(part: email.message.Message) -> str | None:
    try:
        return part.get_content_disposition()
    except Exception:  # noqa: BLE001
        return None


def part_filename(part: email.message.Message) -> str:
    """The part's file name (RFC 2231 and RFC 2047 decoded), or '' if it has none."""
    try:
        name = part.get_filename() or ""
    except Exception:  # noqa: BLE001
        name = ""
    if not name.strip() or "\ufffd" in name or "=?" in name:
        name = _filename_from_raw(part) or name
    return storable(name) if name.strip() else ""


def _filename_from_raw(part: email.message.Message) -> str:
    # The compat32 parser is lenient where the modern one gives up (unquoted encoded-words,
    # raw 8-bit names); feed it the raw headers with 8-bit bytes already decoded.
    legacy = email.message.Message()
    for header in ("Content-Disposition", "Content-Type"):
        raw = _raw_header(part, header)
        if raw is not None:
            legacy[header] = raw
    try:
        name = legacy.get_filename() or ""
    except Exception:  # noqa: BLE001
        return ""
    return _decode_words(name) if "=?" in name else name


def is_document_candidate(part: email.message.Message) -> bool:
    """A leaf that is meant as a file: named, marked as attachment, or not text at all."""
    maintype = content_type(part).partition("/")[0]
    if maintype in ("multipart", "message"):
        return False
    if part_filename(part) or _disposition(part) == "attachment":
        return True
    return maintype != "text"


# --- bodies and children ---------------------------------------------------------------------


def payload(part: email.message.Message) -> bytes | None:
    """The decoded body of a leaf part; None if it cannot be decoded."""
    fast = _clean_base64(part)
    if fast is not None:
        return fast
    try:
        data = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(data, bytes):
        return None
    if any(isinstance(d, _BROKEN_BASE64) for d in part.defects):
        return None
    return data


_CLEAN_BASE64 = re.compile(r"[A-Za-z0-9+/\s]*(?:={1,2}\s*)?")


def _clean_base64(part: email.message.Message) -> bytes | None:
    """Well-formed base64 decoded straight from the parsed text. The stdlib's decode makes
    three more copies of a large attachment on the way (encode, split lines, join); for
    anything not plainly valid we return None and let the stdlib decide, defects and all."""
    try:
        if str(part.get("Content-Transfer-Encoding", "")).strip().lower() != "base64":
            return None
        text = part.get_payload()
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(text, str) or not text.isascii() or not _CLEAN_BASE64.fullmatch(text):
        return None
    spaces = sum(text.count(c) for c in " \t\r\n\f\v")
    if (len(text) - spaces) % 4:
        return None
    try:
        return binascii.a2b_base64(text)
    except binascii.Error:
        return None


def part_text(part: email.message.Message) -> str:
    """A text part's content as str, surviving wrong and unknown charsets."""
    data = payload(part) or b""
    for candidate in (part_codec(part) or "ascii", "utf-8"):
        try:
            return storable(data.decode(candidate))
        except UnicodeDecodeError:
            continue
    return data.decode("cp1252", "replace")


def part_codec(part: email.message.Message) -> str | None:
    """The codec of the part's declared charset; None if it declares none or none usable."""
    try:
        return codec_name(part.get_content_charset())
    except Exception:  # noqa: BLE001 - a hostile Content-Type can trip the stdlib's parser
        return None


# Python knows these names, but they are no charset of mail: they turn escapes or IDNA into
# text (making lone surrogates on the way) or refuse everything ("undefined").
_NOT_MAIL_CODECS = frozenset({"unicode-escape", "raw-unicode-escape", "idna", "punycode",
                              "undefined"})
# IANA charset names are short ASCII words; anything else (NUL, spaces, 8-bit) is no name.
_CHARSET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+\-]{0,63}")


def codec_name(charset: str | None) -> str | None:
    """The Python codec for a MIME charset name, or None when the name is unusable: unknown,
    malformed, a bytes transform (base64, rot13) or one of _NOT_MAIL_CODECS. Decoding with
    what this returns can fail only with UnicodeDecodeError."""
    name = charset.strip() if isinstance(charset, str) else ""
    if not _CHARSET_NAME.fullmatch(name):
        return None
    try:
        info = codecs.lookup(name)
    except LookupError:
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_MAIL_CODECS:
        return None
    return info.name


def body(part: email.message.Message) -> list[email.message.Message] | str | None:
    """The part's sub-parts, or its body text still transfer-encoded; None if the stdlib
    cannot hand it out: `get_payload()` decodes 8-bit text with the charset the part names,
    unchecked (a NUL in the name raised ValueError)."""
    try:
        value = part.get_payload()
    except Exception:  # noqa: BLE001 - see above; hostile Content-Transfer-Encoding too
        return None
    return value if isinstance(value, list | str) else None


def children(part: email.message.Message) -> list[email.message.Message]:
    """Sub-parts of a multipart, or the enclosed message of a message/* part."""
    body_ = body(part)
    if not isinstance(body_, list):
        return []
    if content_type(part) == "message/rfc822" and len(body_) == 1:
        return [_enclosed_message(part, body_[0])]
    return [p for p in body_ if isinstance(p, email.message.Message)]


def _enclosed_message(part: email.message.Message,
                      inner: email.message.Message) -> email.message.Message:
    # Gmail base64-encodes attached messages (RFC 2046 forbids it); the parser then sees
    # base64 text instead of headers, so decode it and parse again.
    if header_text(part, "Content-Transfer-Encoding").strip().lower() != "base64":
        return inner
    text = body(inner)
    if inner.keys() or inner.is_multipart() or not isinstance(text, str):
        return inner
    try:
        raw = base64.b64decode(text.encode("ascii", "surrogateescape"))
    except (binascii.Error, ValueError):
        return inner
    return read_message(raw)
