"""Reads a share request out of an e-mail: recipients, title, the sender's note, documents.

Pure functions (no database, no network). Untrusted input: nothing here may raise on a
malformed message; problems the member can fix come back as a typed `Reject`.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.errors
import email.header
import email.message
import email.parser
import email.policy
import email.utils
import html
import re
import unicodedata
import urllib.parse
from dataclasses import dataclass
from html.parser import HTMLParser

import bleach
from email_validator import EmailNotValidError, validate_email

from mailbridge.config import LimitSettings, Settings
from mailbridge.filenames import KIND_CONTENT_TYPES, detect_kind, sanitise_filename
from mailbridge.outcomes import Reject

MAX_TITLE_CHARS = 500
MAX_NOTE_CHARS = 20_000
# Recipient lines sit at the very top; a bigger prefix than this is never needed to find them.
MAX_BODY_SCAN_CHARS = 64 * 1024
# html5lib (inside bleach) and HTMLParser slow down badly on huge or deeply nested input;
# no note needs more HTML than this, and recipient lines are found near the top.
MAX_NOTE_HTML_CHARS = 100_000
MAX_HTML_SCAN_CHARS = 16 * 1024
MAX_HTML_DEPTH = 256

NOTE_TAGS = frozenset({
    "p", "br", "b", "strong", "i", "em", "u", "ul", "ol", "li", "blockquote", "a", "div",
    "span", "pre", "code", "h1", "h2", "h3", "h4",
    "table", "thead", "tbody", "tfoot", "tr", "th", "td", "caption",
})
NOTE_ATTRIBUTES = {"a": ["href", "title"], "td": ["colspan", "rowspan"],
                   "th": ["colspan", "rowspan"]}
NOTE_PROTOCOLS = frozenset({"http", "https", "mailto"})

_TNEF_TYPES = {"application/ms-tnef", "application/vnd.ms-tnef"}
_SIGNATURE_TYPES = {"application/pkcs7-signature", "application/x-pkcs7-signature",
                    "application/pgp-signature"}
_BROKEN_BASE64 = (email.errors.InvalidBase64CharactersDefect,
                  email.errors.InvalidBase64LengthDefect)
_RECIPIENT_LINE = re.compile(r"(?:to|recipients?)\s*:(.*)", re.IGNORECASE | re.DOTALL)
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_ADDRESS_TOKEN = re.compile(r"<[^<>]*>|[^\s<>]+")
_HIDDEN_HTML = re.compile(r"<(script|style|head|title|template)\b.*?(</\1\s*>|\Z)",
                          re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9]*)")
# Tags that never nest (void) or that HTML closes implicitly: they add no depth.
_FLAT_TAGS = frozenset({"br", "img", "hr", "meta", "link", "input", "col", "area", "base",
                        "wbr", "source", "embed", "param", "track", "p", "li", "td", "th",
                        "tr", "dt", "dd", "option"})
_CID_REF = re.compile(r"cid:([^\s\"'<>()]+)", re.IGNORECASE)


@dataclass(frozen=True)
class Attachment:
    filename: str       # sanitised display name, never used as a path
    kind: str           # one of config.DEFAULT_ALLOWED_TYPES
    content_type: str   # the MIME type we serve it as (from kind, not from the sender)
    data: bytes


@dataclass(frozen=True)
class ParsedShare:
    recipients: list[str]
    title: str
    note_html: str
    attachments: list[Attachment]


# --- reading ---------------------------------------------------------------------------------


class NestedTooDeeply(email.errors.MessageDefect):
    """The parser gave up on the MIME nesting; only the top headers were read."""


def read_message(raw: bytes) -> email.message.EmailMessage:
    """Parse `raw` with the modern policy; never raises (worst case: headers only, or empty)."""
    try:
        return email.message_from_bytes(raw, policy=email.policy.default)
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


def parse_share(msg: email.message.EmailMessage, envelope_to: list[str],
                settings: Settings) -> ParsedShare | Reject:
    """Everything a share needs, or the first problem the member must fix (recipients first)."""
    recipients = find_recipients(msg, envelope_to, settings)
    if isinstance(recipients, Reject):
        return recipients
    attachments = find_attachments(msg, settings.limits)
    if isinstance(attachments, Reject):
        return attachments
    return ParsedShare(recipients=recipients, title=message_title(msg),
                       note_html=sender_note(msg), attachments=attachments)


def message_title(msg: email.message.Message) -> str:
    """The decoded Subject on one line, at most MAX_TITLE_CHARS long."""
    text = _header_text(msg, "Subject")
    return _one_line(text)[:MAX_TITLE_CHARS].strip()


# --- headers and parts, read defensively ------------------------------------------------------


def _header_text(part: email.message.Message, name: str) -> str:
    """A header's decoded text; falls back to the raw bytes when the parser chokes or loses them."""
    try:
        value = part.get(name)
        text = "" if value is None else str(value)
    except Exception:  # noqa: BLE001 - header parsing bugs on hostile input
        text = "\ufffd"
    if "\ufffd" in text or "=?" in text:
        raw = _raw_header(part, name)
        if raw is not None:
            return _decode_words(raw)
    return text


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


def _one_line(text: str) -> str:
    """Whitespace collapsed; control and bidi embedding/override characters dropped."""
    text = "".join(" " if ch.isspace() else ch for ch in text)
    text = "".join(ch for ch in text
                   if unicodedata.category(ch) not in ("Cc", "Cs") and ch not in _BIDI_CONTROLS)
    return " ".join(text.split())


def _content_type(part: email.message.Message) -> str:
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
    return name if name.strip() else ""


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


def _payload(part: email.message.Message) -> bytes | None:
    """The decoded body of a leaf part; None if it cannot be decoded."""
    try:
        data = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(data, bytes):
        return None
    if any(isinstance(d, _BROKEN_BASE64) for d in part.defects):
        return None
    return data


def part_text(part: email.message.Message) -> str:
    """A text part's content as str, surviving wrong and unknown charsets."""
    data = _payload(part) or b""
    try:
        charset = part.get_content_charset() or "us-ascii"
    except Exception:  # noqa: BLE001
        charset = "us-ascii"
    for candidate in (charset, "utf-8"):
        try:
            return data.decode(candidate)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("cp1252", "replace")


def _children(part: email.message.Message) -> list[email.message.Message]:
    """Sub-parts of a multipart, or the enclosed message of a message/* part."""
    try:
        payload = part.get_payload()
    except Exception:  # noqa: BLE001
        return []
    if not isinstance(payload, list):
        return []
    if _content_type(part) == "message/rfc822" and len(payload) == 1:
        return [_enclosed_message(part, payload[0])]
    return [p for p in payload if isinstance(p, email.message.Message)]


def _enclosed_message(part: email.message.Message,
                      inner: email.message.Message) -> email.message.Message:
    # Gmail base64-encodes attached messages (RFC 2046 forbids it); the parser then sees
    # base64 text instead of headers, so decode it and parse again.
    if _header_text(part, "Content-Transfer-Encoding").strip().lower() != "base64":
        return inner
    body = inner.get_payload()
    if inner.keys() or inner.is_multipart() or not isinstance(body, str):
        return inner
    try:
        raw = base64.b64decode(body.encode("ascii", "surrogateescape"))
    except (binascii.Error, ValueError):
        return inner
    return read_message(raw)


# --- recipients ------------------------------------------------------------------------------


def find_recipients(msg: email.message.EmailMessage, envelope_to: list[str],
                    settings: Settings) -> list[str] | Reject:
    """Recipients from To:/Recipients: lines at the top of the body, then plus-addresses."""
    lines = _body_lines(msg)
    values, _ = _recipient_lines(lines)
    # (as the member wrote it, the address it stands for)
    written = [(text, text) for value in values for text in _split_addresses(value)]
    written += _plus_recipients(msg, envelope_to, settings)
    found: list[str] = []
    for shown, text in written:
        address = _normalise(text)
        if address is None:
            return Reject("bad_recipient", "a recipient is not a valid e-mail address",
                          {"address": shown})
        if _is_own(address, settings):
            return Reject("own_address", "a recipient is one of our own addresses",
                          {"address": shown})
        if address not in found:
            found.append(address)
    if not found:
        return Reject("no_recipients", "no recipient lines and no plus-address")
    limit = settings.limits.max_recipients
    if len(found) > limit:
        return Reject("too_many_recipients", "more recipients than allowed",
                      {"count": len(found), "limit": limit})
    return found


def _recipient_lines(lines: list[str]) -> tuple[list[str], int]:
    """The address text of the leading To:/Recipients: lines, and how many lines they (and the
    blank lines among them) take up; stops at the first other line.

    People wrap long lists: right after a recipient line, a line of nothing but addresses
    continues it, and so does any line after one ending in ',' or ';' or with no address yet.
    """
    values: list[str] = []
    used = 0
    after_label = wants_more = False
    for line in lines:
        text = line.strip()
        if not text:
            after_label = wants_more = False
            used += 1
            continue
        match = _RECIPIENT_LINE.fullmatch(text)
        if match:
            value = match.group(1).strip()
        elif wants_more or (after_label and _only_addresses(text)):
            value = text
        else:
            break
        values.append(value)
        after_label = True
        wants_more = not value or value.endswith((",", ";"))
        used += 1
    return values, (used if values else 0)


def _only_addresses(text: str) -> bool:
    tokens = _split_addresses(text)
    return bool(tokens) and all("@" in token for token in tokens)


def _split_addresses(value: str) -> list[str]:
    """Addresses as written: separated by commas, semicolons or spaces; `Name <addr>` allowed."""
    value = re.sub(r'"[^"]*"', " ", value)  # quoted display names may hold separators
    found: list[str] = []
    for item in re.split(r"[,;]", value):
        has_brackets = "<" in item
        for token in _ADDRESS_TOKEN.findall(item):
            bracketed = token.startswith("<")
            token = token.strip("<>").strip().strip("()[]'").rstrip(".")
            if token.lower().startswith("mailto:"):
                token = token[len("mailto:"):]
            # Next to <addr>, words without an @ are the display name.
            if token and (bracketed or "@" in token or not has_brackets):
                found.append(token)
    return found


def _plus_recipients(msg: email.message.Message, envelope_to: list[str],
                     settings: Settings) -> list[tuple[str, str]]:
    """`share+dr.smith=ortho.example@portal.example` means dr.smith@ortho.example."""
    candidates = list(envelope_to)
    for header in ("To", "Cc"):
        candidates += [addr for _, addr in _header_addresses(msg, header)]
    prefix = settings.sharing_local.lower() + "+"
    domain = settings.sharing_domain.lower()
    found = []
    for candidate in candidates:
        shown = candidate.strip().strip("<>")
        local, at, host = shown.rpartition("@")
        if not at or host.lower() != domain or not local.lower().startswith(prefix):
            continue
        user, eq, user_domain = local[len(prefix):].rpartition("=")
        if eq:
            found.append((shown, f"{user}@{user_domain}"))
    return found


def _header_addresses(msg: email.message.Message, name: str) -> list[tuple[str, str]]:
    try:
        values = [str(v) for v in (msg.get_all(name) or [])]
    except Exception:  # noqa: BLE001
        values = [v for k, v in msg.raw_items() if k.lower() == name.lower()]
    try:
        return email.utils.getaddresses(values)
    except Exception:  # noqa: BLE001
        return []


def _normalise(text: str) -> str | None:
    try:
        return validate_email(text, check_deliverability=False).normalized.lower()
    except (EmailNotValidError, ValueError, UnicodeError):
        return None


def _is_own(address: str, settings: Settings) -> bool:
    domain = address.rpartition("@")[2]
    own = {d.lower() for d in settings.own_domains}
    return address == settings.addresses.sharing.lower() or domain in own


# --- the body and the note -------------------------------------------------------------------


def _body_part(msg: email.message.Message) -> email.message.Message | None:
    """The first text/plain body part, else the first text/html; never one inside a forward."""
    first_html = None
    stack = [msg]
    while stack:
        part = stack.pop()
        kind = _content_type(part)
        if part.is_multipart():
            if not kind.startswith("message/"):
                stack.extend(reversed(_children(part)))
            continue
        if _is_document_candidate(part):
            continue
        if kind == "text/plain":
            return part
        if kind == "text/html" and first_html is None:
            first_html = part
    return first_html


def _body_lines(msg: email.message.Message) -> list[str]:
    part = _body_part(msg)
    if part is None:
        return []
    text = part_text(part)
    if _content_type(part) == "text/html":
        return [line for line, _ in _html_lines(_visible_html(text))]
    return _plain_lines(part, text[:MAX_BODY_SCAN_CHARS])


def _plain_lines(part: email.message.Message, text: str) -> list[str]:
    lines = text.splitlines()
    try:
        flowed = str(part.get_param("format", "")).lower() == "flowed"
    except Exception:  # noqa: BLE001
        flowed = False
    return _unflow(lines) if flowed else lines


def _unflow(lines: list[str]) -> list[str]:
    # RFC 3676: a line ending in a space continues on the next (the signature mark excepted).
    out: list[str] = []
    pending = ""
    for line in lines:
        pending += line
        if not line.endswith(" ") or line == "-- ":
            out.append(pending)
            pending = ""
    if pending:
        out.append(pending)
    return out


def sender_note(msg: email.message.EmailMessage) -> str:
    """The member's note as safe HTML: the body without the recipient lines at the top."""
    part = _body_part(msg)
    if part is None:
        return ""
    text = part_text(part)
    if _content_type(part) == "text/html":
        return _html_note(_visible_html(text))
    lines = _plain_lines(part, text[:MAX_NOTE_HTML_CHARS])
    _, used = _recipient_lines(lines)
    return _plain_note("\n".join(lines[used:]))


def _plain_note(text: str) -> str:
    return html.escape(text.strip("\n")[:MAX_NOTE_CHARS]).replace("\n", "<br>")


def _visible_html(source: str) -> str:
    """The HTML without head, style and script blocks (bleach would keep their text)."""
    return _HIDDEN_HTML.sub("", source[:4 * MAX_NOTE_HTML_CHARS])[:MAX_NOTE_HTML_CHARS]


def _html_note(source: str) -> str:
    lines = _html_lines(source)
    _, used = _recipient_lines([line for line, _ in lines])
    if used:
        source = source[lines[used - 1][1]:]
    if _nesting_depth(source) > MAX_HTML_DEPTH:
        # Broken or hostile HTML would take html5lib minutes: keep just the words.
        text = html.unescape(re.sub(r"<[^<>]*(>|\Z)", " ", source))
        return _plain_note(" ".join(text.split()))
    note = _clean_html(source)
    if len(note) > MAX_NOTE_CHARS:
        note = _clean_html(note[:MAX_NOTE_CHARS])  # re-clean: the cut may split a tag
    return note


def _nesting_depth(source: str) -> int:
    depth = deepest = 0
    for match in _HTML_TAG.finditer(source):
        if match.group(2).lower() in _FLAT_TAGS:
            continue
        depth = max(0, depth - 1) if match.group(1) else depth + 1
        deepest = max(deepest, depth)
    return deepest


def _clean_html(source: str) -> str:
    return bleach.clean(source, tags=NOTE_TAGS, attributes=NOTE_ATTRIBUTES,
                        protocols=NOTE_PROTOCOLS, strip=True, strip_comments=True).strip()


class _HtmlLines(HTMLParser):
    """HTML as visible text lines, each with the source offset where the line ended."""

    BREAKS = frozenset({"br", "p", "div", "li", "tr", "table", "blockquote", "pre",
                        "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "hr"})
    HIDDEN = frozenset({"script", "style", "head", "title", "template"})

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.starts = [0] + [m.end() for m in re.finditer("\n", source)]
        self.lines: list[tuple[str, int]] = []
        self.current: list[str] = []
        self.hidden = 0

    def _break(self, is_br: bool = False) -> None:
        # Block edges only end a line that has text; <br> also makes blank lines, and a line
        # ended by <br> ends after it (so cutting there does not leave the <br> behind).
        text = "".join(self.current)
        if text.strip() or is_br:
            row, col = self.getpos()
            offset = self.starts[min(row, len(self.starts)) - 1] + col
            if is_br:
                offset += len(self.get_starttag_text() or "")
            self.lines.append((text, offset))
        self.current = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BREAKS:
            self._break(is_br=tag == "br")

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if tag in self.BREAKS:
            self._break(is_br=tag == "br")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BREAKS:
            self._break()

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.current.append(data.replace("\r", " ").replace("\n", " "))


def _html_lines(source: str) -> list[tuple[str, int]]:
    """Text lines of the first MAX_HTML_SCAN_CHARS of `source` (HTMLParser is quadratic on
    some broken input), each with the offset in `source` where it ends."""
    source = source[:MAX_HTML_SCAN_CHARS]
    parser = _HtmlLines(source)
    try:
        parser.feed(source)
        parser.close()
    except Exception:  # noqa: BLE001 - HTMLParser is lenient, but hostile input is hostile
        pass
    if parser.current:
        parser.lines.append(("".join(parser.current), len(source)))
    return parser.lines


# --- attachments -----------------------------------------------------------------------------


def find_attachments(msg: email.message.EmailMessage,
                     limits: LimitSettings) -> list[Attachment] | Reject:
    """The documents in `msg` (also inside forwarded messages), checked against `limits`."""
    walked = _walk(msg, limits)
    if isinstance(walked, Reject):
        return walked
    leaves, inline_ids = walked
    documents: list[Attachment] = []
    total = 0
    for part in leaves:
        if not _is_document_candidate(part) or _is_signature(part):
            continue
        name = part_filename(part)
        if _is_tnef(part, name):
            return Reject("tnef", "Outlook rich-text message (winmail.dat)")
        data = _payload(part)
        if data is None:
            return Reject("unreadable_attachment", "an attachment could not be decoded",
                          {"filename": sanitise_filename(name, None, len(documents) + 1)})
        if not data or _is_inline_image(part, data, inline_ids, limits):
            continue
        if len(data) > limits.max_file_bytes:
            return Reject("too_large", "an attachment is larger than allowed",
                          {"filename": sanitise_filename(name, None, len(documents) + 1),
                           "limit_bytes": limits.max_file_bytes})
        kind = detect_kind(data)
        if kind is None or kind not in limits.allowed_types:
            return Reject("disallowed_type", "an attachment is not of an allowed type",
                          {"filename": sanitise_filename(name, None, len(documents) + 1),
                           "allowed": list(limits.allowed_types)})
        total += len(data)
        if total > limits.max_total_bytes:
            return Reject("too_large_total", "the attachments together are larger than allowed",
                          {"limit_bytes": limits.max_total_bytes})
        documents.append(Attachment(
            filename=sanitise_filename(name, kind, len(documents) + 1), kind=kind,
            content_type=KIND_CONTENT_TYPES[kind], data=data))
    if not documents:
        return Reject("no_attachments", "the message has no documents")
    return documents


def _walk(msg: email.message.Message,
          limits: LimitSettings) -> tuple[list[email.message.Message], set[str]] | Reject:
    """Leaf parts in order, and the Content-IDs that HTML parts show inline, within limits."""
    if any(isinstance(d, NestedTooDeeply) for d in msg.defects):
        return Reject("too_deep", "the message is nested too deeply", {"limit": limits.max_depth})
    leaves: list[email.message.Message] = []
    inline_ids: set[str] = set()
    count = 0
    stack = [(msg, 0)]
    while stack:
        part, depth = stack.pop()
        count += 1
        if count > limits.max_parts:
            return Reject("too_many_parts", "the message has too many MIME parts",
                          {"limit": limits.max_parts})
        if depth > limits.max_depth:
            return Reject("too_deep", "the message is nested too deeply",
                          {"limit": limits.max_depth})
        if part.is_multipart():
            stack.extend((child, depth + 1) for child in reversed(_children(part)))
            continue
        leaves.append(part)
        if _content_type(part) == "text/html" and not _is_document_candidate(part):
            inline_ids.update(_cid_references(part_text(part)))
    return leaves, inline_ids


def _is_document_candidate(part: email.message.Message) -> bool:
    """A leaf that is meant as a file: named, marked as attachment, or not text at all."""
    maintype = _content_type(part).partition("/")[0]
    if maintype in ("multipart", "message"):
        return False
    if part_filename(part) or _disposition(part) == "attachment":
        return True
    return maintype != "text"


def _is_signature(part: email.message.Message) -> bool:
    # S/MIME and PGP signatures ride along as parts; they are not documents to share.
    return (_content_type(part) in _SIGNATURE_TYPES
            or part_filename(part).strip().lower() == "smime.p7s")


def _is_tnef(part: email.message.Message, name: str) -> bool:
    return _content_type(part) in _TNEF_TYPES or name.strip().lower() == "winmail.dat"


def _cid_references(source: str) -> set[str]:
    return {_content_id(urllib.parse.unquote(ref)) for ref in _CID_REF.findall(source)}


def _content_id(text: str) -> str:
    return text.strip().strip("<>").strip().lower()


def _is_inline_image(part: email.message.Message, data: bytes, inline_ids: set[str],
                     limits: LimitSettings) -> bool:
    """A small image the HTML body shows inline (a logo in a signature), not a document."""
    if len(data) > limits.inline_image_max_bytes:
        return False
    cid = _content_id(_header_text(part, "Content-ID"))
    if not cid or cid not in inline_ids:
        return False
    return (_content_type(part).startswith("image/")
            or detect_kind(data) in ("png", "jpeg", "gif", "tiff", "heic"))
