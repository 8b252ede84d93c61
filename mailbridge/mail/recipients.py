"""Who a share is for: To:/Recipients: lines at the top of the body, then plus-addresses.

Addresses are validated and normalised; our own addresses and domains are refused.
"""

from __future__ import annotations

import email.message
import email.utils
import re

from mailbridge.mail.addresses import normalise
from mailbridge.mail.text import body_lines
from mailbridge.outcomes import Notice, Reject
from mailbridge.settings import Settings

_RECIPIENT_LINE = re.compile(r"(?:to|recipients?)\s*:(.*)", re.IGNORECASE | re.DOTALL)
_ADDRESS_TOKEN = re.compile(r"<[^<>]*>|[^\s<>]+")


def find_recipients(msg: email.message.EmailMessage, envelope_to: list[str],
                    settings: Settings) -> list[str] | Reject:
    """Recipients from To:/Recipients: lines at the top of the body, then plus-addresses."""
    values, _ = recipient_lines(body_lines(msg))
    # (as the member wrote it, the address it stands for)
    written = [(text, text) for value in values for text in _split_addresses(value)]
    written += _plus_recipients(msg, envelope_to, settings)
    found = _checked_addresses(written, settings)
    if isinstance(found, Reject):
        return found
    if not found:
        return Reject(Notice.NO_RECIPIENTS, "no recipient lines and no plus-address")
    limit = settings.limits.max_recipients
    if len(found) > limit:
        return Reject(Notice.TOO_MANY_RECIPIENTS, "more recipients than allowed",
                      {"count": len(found), "limit": limit})
    return found


def _checked_addresses(written: list[tuple[str, str]],
                       settings: Settings) -> list[str] | Reject:
    """The distinct normalised addresses, in order; the first invalid or own one is refused."""
    found: list[str] = []
    for shown, text in written:
        address = normalise(text)
        if address is None:
            return Reject(Notice.BAD_RECIPIENT, "a recipient is not a valid e-mail address",
                          {"address": shown})
        if _is_own(address, settings):
            return Reject(Notice.OWN_ADDRESS, "a recipient is one of our own addresses",
                          {"address": shown})
        if address not in found:
            found.append(address)
    return found


def recipient_lines(lines: list[str]) -> tuple[list[str], int]:
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


def _is_own(address: str, settings: Settings) -> bool:
    domain = address.rpartition("@")[2]
    own = {d.lower() for d in settings.own_domains}
    return address == settings.addresses.sharing.lower() or domain in own
