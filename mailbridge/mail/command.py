"""Reads the command a member typed in a reply to a receipt: the first line of the reply that
is not quoted text, signature or a client's attribution line. Pure functions; never raises."""

from __future__ import annotations

import email.message
import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from mailbridge.mail.mime import part_text
from mailbridge.mail.text import body_part, is_html
from mailbridge.mail.visible import visible_lines

COMMANDS = frozenset({"revoke", "status", "resend", "extend", "help", "approve", "deny"})

# The command sits at the very top; nothing further down is ever needed.
MAX_SCAN_CHARS = 64 * 1024
MAX_LINE_CHARS = 1000
# Outlook puts its "From:" line a few lines above "Sent:" when To/Cc wrap.
HEADER_BLOCK_LINES = 4
# Attribution lines are short; the cap also keeps the regex linear on hostile input.
MAX_ATTRIBUTION_CHARS = 500

_WROTE = (r"wrote|schrieb|a\s+écrit|escribió|ha\s+scritto|schreef|skrev|kirjoitti|napisał"
          r"|написал|написала|escreveu|yazdı")
# An attribution line ends with ':' and names the verb, e.g. "On <date>, <name> wrote:",
# "Am <date> schrieb <name>:", "<name> schrieb am <date>:", "Le <date>, <name> a écrit :".
_ATTRIBUTION = re.compile(rf".*\b(?:{_WROTE})\b.*:", re.IGNORECASE | re.DOTALL)
# Where a wrapped attribution may start: the words clients open it with, or a date.
_ATTRIBUTION_OPENER = re.compile(
    r"(?:on|am|le|el|il|op|em|den|dne|w\s+dniu|в|\d)\b", re.IGNORECASE)
_SEPARATOR = re.compile(
    r"-{2,}\s*(?:original\s+message|forwarded\s+message|ursprüngliche\s+nachricht"
    r"|weitergeleitete\s+nachricht|message\s+d'origine|message\s+transféré|mensaje\s+original"
    r"|messaggio\s+originale|oorspronkelijk\s+bericht)\b.*"
    r"|_{5,}|-{5,}|\**(?:begin\s+forwarded\s+message|anfang\s+der\s+weitergeleiteten\s+nachricht"
    r"|début\s+du\s+message\s+réexpédié)\s*:.*",
    re.IGNORECASE)
_SIGNATURE = re.compile(
    r"--|sent\s+from\s+(?:my|mail|outlook|yahoo)\b.*|sent\s+with\s+.*|get\s+outlook\s+for\b.*"
    r"|von\s+meinem\s+.*gesendet.*|envoyé\s+de\s+mon\b.*|enviado\s+desde\s+mi\b.*",
    re.IGNORECASE)
# Outlook's plain-text quote header, also localized and with *bold* markers from HTML.
_HEADER_FROM = re.compile(r"\**(?:from|von|de|da|van|från|fra|od|от)\s*:.*", re.IGNORECASE)
_HEADER_SENT = re.compile(
    r"\**(?:sent|date|gesendet|datum|envoyé|inviato|data|enviado|enviada|verzonden|skickat"
    r"|sendt|wysłano|отправлено)\s*:.*", re.IGNORECASE)

_STRIP_AROUND = " \t*_~`\"'.,;:!?()[]"
_ALL_RECIPIENTS = frozenset({"all", "everyone", "everybody", "all recipients"})
_BRACKETED_ADDRESS = re.compile(r"<([^<>\s]+@[^<>\s]+)>")
_HOURS = re.compile(
    r"(?:by\s+|for\s+|\+\s*)?(\d{1,6}(?:[.,]\d{1,4})?)\s*(h|hrs?|hours?|d|days?)?", re.IGNORECASE)


@dataclass(frozen=True)
class Command:
    name: str  # revoke | status | resend | extend | help | approve | deny
    argument: str = ""
    recognised: bool = True


UNRECOGNISED = Command("help", "", recognised=False)


def extract_command(msg: email.message.Message) -> Command:
    return parse_command(first_unquoted_line(msg))


# --- the first line the member typed ----------------------------------------------------------


def first_unquoted_line(msg: email.message.Message) -> str | None:
    """The first non-empty line above any quote, forward header or signature; None if none.

    Read from the text/plain part when it has text: that is what the member typed, and an
    HTML part can hide text from them (a hidden "revoke" must never act). Otherwise the HTML
    is read as a mail client shows it, hidden elements left out."""
    try:
        part = body_part(msg)
        if part is None:
            return None
        if is_html(part):
            lines = visible_lines(part_text(part), stop_at_quote=True)
        else:
            lines = part_text(part)[:MAX_SCAN_CHARS].splitlines()
        return _first_typed_line([_visible(line).strip() for line in lines])
    except Exception:  # noqa: BLE001 - hostile mail must not stop the worker
        return None


def _first_typed_line(lines: list[str]) -> str | None:
    """The first non-empty line, unless a quote marker, attribution, forward header or
    signature comes first."""
    for index, line in enumerate(lines):
        if _starts_quote(lines, index):
            return None
        if line:
            return line[:MAX_LINE_CHARS]
    return None


def _starts_quote(lines: list[str], index: int) -> bool:
    line = lines[index]
    if line.startswith(">") or _SEPARATOR.fullmatch(line) or _SIGNATURE.fullmatch(line):
        return True
    if _is_attribution(line):
        return True
    # Clients wrap a long attribution ("On <date>, <name> <" / "<address>> wrote:"). No
    # command starts like an attribution, so a member's line is never mistaken for one.
    following = lines[index + 1] if index + 1 < len(lines) else ""
    if (following and _ATTRIBUTION_OPENER.match(line)
            and _is_attribution(f"{line} {following}")):
        return True
    if _HEADER_FROM.fullmatch(line):
        window = lines[index + 1:index + 1 + HEADER_BLOCK_LINES]
        return any(_HEADER_SENT.fullmatch(other) for other in window)
    return False


def _is_attribution(line: str) -> bool:
    return (line.endswith(":") and len(line) <= MAX_ATTRIBUTION_CHARS
            and _ATTRIBUTION.fullmatch(line) is not None)


def _visible(line: str) -> str:
    # Zero-width spaces, BOMs and bidi marks are invisible but would defeat matching.
    return "".join(ch for ch in line if unicodedata.category(ch) not in ("Cf", "Cc")
                   or ch == "\t")


# --- the command --------------------------------------------------------------------------------


def parse_command(line: str | None) -> Command:
    """The command on `line`; the first word decides. Unknown or empty → unrecognised help."""
    if not line:
        return UNRECOGNISED
    text = _visible(line).strip(_STRIP_AROUND + "\u00a0")
    words = text.split(None, 1)
    if not words:
        return UNRECOGNISED
    name = words[0].strip(_STRIP_AROUND).lower()
    rest = words[1].strip(_STRIP_AROUND) if len(words) > 1 else ""
    if name not in COMMANDS:
        return UNRECOGNISED
    if name in ("revoke", "resend", "approve", "deny"):
        return Command(name, _address_argument(rest))
    if name == "extend":
        return Command(name, _hours_argument(rest))
    return Command(name)


def _address_argument(text: str) -> str:
    """One address, lower-cased; '' for everyone; anything else as given (it then matches no
    recipient, so a garbled address can never widen a revoke to every recipient)."""
    if not text or " ".join(text.lower().split()) in _ALL_RECIPIENTS:
        return ""
    candidates = _BRACKETED_ADDRESS.findall(text) or [
        word for word in re.split(r"[\s,;]+", text) if "@" in word]
    addresses = {_clean_address(word) for word in candidates}
    if len(addresses) == 1:
        return addresses.pop()
    return text


def _clean_address(word: str) -> str:
    word = word.strip(_STRIP_AROUND + "<>")
    # Outlook's plain text renders links as "dr@x.example<mailto:dr@x.example>".
    word = word.split("<", 1)[0]
    if word.lower().startswith("mailto:"):
        word = word[len("mailto:"):]
    return word.strip(_STRIP_AROUND + "<>").lower()


def _hours_argument(text: str) -> str:
    """A positive number of hours in plain decimal ("12", "1.5"); '' for none; otherwise the
    text as given, for the caller to answer that it was not understood."""
    if not text:
        return ""
    match = _HOURS.fullmatch(text.strip())
    if not match:
        return text
    try:
        value = Decimal(match.group(1).replace(",", "."))
    except InvalidOperation:
        return text
    if (match.group(2) or "h").lower().startswith("d"):
        value *= 24
    if value <= 0:
        return text
    return format(value.normalize(), "f")
