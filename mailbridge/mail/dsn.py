"""Delivery status notifications (RFC 3464) as mail systems write them — Postfix, Exim, Gmail,
Microsoft 365: which recipients a report says failed, and with what status. Pure; never
raises on a malformed report."""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from dataclasses import dataclass
from email.message import EmailMessage, Message
from email.parser import HeaderParser

from mailbridge.mail.mime import body, children, header_text, payload

REPORT_TYPES = ("message/delivery-status", "message/global-delivery-status")
_BLANK_LINE = re.compile(r"\r?\n[ \t]*\r?\n")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


@dataclass(frozen=True)
class Failure:
    """One recipient a report says the message could not be delivered to."""

    recipient: str
    status: str  # e.g. "5.1.1"; "" if the report gave none
    diagnostic: str  # the remote server's answer, if the report quotes it


def failed_recipients(message: EmailMessage) -> list[Failure]:
    """The recipients a delivery report marks `Action: failed` — final by definition (RFC 3464
    2.3.3), whatever the status class; `delayed`, `delivered`, `relayed` and `expanded` are
    not failures. A classic Exim bounce without a report part lists them in
    X-Failed-Recipients instead. Anything else (auto-replies, read receipts): []."""
    try:
        if message.get_content_type() != "multipart/report":
            return _exim_failures(message)
        parts = [p for p in message.iter_parts() if p.get_content_type() in REPORT_TYPES]
    except Exception:  # hostile MIME can trip the stdlib's parsers; not a report then
        return []
    failures = []
    for part in parts:
        for block in _blocks(part):
            if block.get("Action", "").strip().lower().split(" ")[0] != "failed":
                continue
            status = _STATUS.search(block.get("Status", ""))
            failures.append(Failure(
                recipient=_address_field(block.get("Final-Recipient")
                                         or block.get("Original-Recipient", "")),
                status=status.group(0) if status else "",
                diagnostic=_address_field(block.get("Diagnostic-Code", ""))))
    return failures


def _blocks(part: Message) -> list[Message]:
    """The report's field groups. The stdlib splits message/delivery-status into blocks, but
    not the global (UTF-8) variant nor an encoded one: rebuild the text and split it here."""
    items = body(part)
    if items is None:
        return []
    text = _utf8("\n\n".join(_as_received(i) for i in (items if isinstance(items, list)
                                                         else [items])))
    encoding = header_text(part, "Content-Transfer-Encoding").strip().lower()
    try:
        if encoding == "base64":
            text = base64.b64decode("".join(text.split())).decode("utf-8", "replace")
        elif encoding == "quoted-printable":
            text = quopri.decodestring(text.encode("ascii", "replace")).decode("utf-8",
                                                                                "replace")
    except (binascii.Error, ValueError):
        return []
    return [HeaderParser().parsestr(chunk.strip("\r\n") + "\n")
            for chunk in _BLANK_LINE.split(text) if chunk.strip()]


def _as_received(item: Message | str) -> str:
    """A block's fields (and whatever the parser took for its body) as received. Writing the
    parsed block back out goes through the stdlib's generator, which re-folds fields (decoding
    encoded-words into lone surrogates it then cannot encode) and trips over blocks that claim
    to be multipart; the fields are read as plain text here anyway."""
    if not isinstance(item, Message):
        return str(item)
    fields = "\n".join(f"{name}: {value}" for name, value in item.raw_items())
    if item.is_multipart():
        rest = [_as_received(sub) for sub in children(item)]
    else:
        rest = [(payload(item) or b"").decode("utf-8", "replace")]
    return "\n\n".join([fields, *rest])


def _utf8(text: str) -> str:
    """Text with the parser's stand-ins for 8-bit bytes read back as UTF-8 and any other lone
    surrogate replaced, so every value taken from it can be stored and mailed."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _exim_failures(message: EmailMessage) -> list[Failure]:
    # Exim sets X-Failed-Recipients only on its permanent-failure bounces, never on warnings.
    values = message.get_all("X-Failed-Recipients") or []
    addresses = [a.strip() for v in values for a in str(v).split(",") if "@" in a]
    return [Failure(recipient=a, status="", diagnostic="") for a in addresses]


def _address_field(value: str) -> str:
    # "rfc822; dr@x.example" / "smtp; 550 5.1.1 ...": the type prefix is not for people.
    value = " ".join(str(value).split())
    kind, sep, rest = value.partition(";")
    return rest.strip() if sep and re.fullmatch(r"[A-Za-z0-9-]+", kind.strip()) else value


def reason(failure: Failure) -> str:
    if failure.diagnostic:
        return failure.diagnostic
    if failure.status:
        return f"delivery failed permanently (status {failure.status})"
    return "delivery failed permanently"
