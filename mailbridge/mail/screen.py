"""Drops mail no human wrote to us: auto-replies, bounces, lists, and our own mail looping back.

RFC 3834 asks responders never to answer such mail; answering would start a mail loop.
"""

from __future__ import annotations

import email.utils
import re
import unicodedata
from collections.abc import Callable

from mailbridge.outcomes import Ignore

# Exchange sets X-Auto-Response-Suppress on ordinary mail too, so it is deliberately absent.
AUTO_REPLY_HEADERS = ("X-Autoreply", "X-Autorespond", "X-Autoresponder",
                      "X-MS-Exchange-Inbox-Rules-Loop")
BOUNCE_HEADERS = ("X-Failed-Recipients", "X-MS-Exchange-Message-Is-Ndr")
LIST_HEADERS = ("List-Id", "List-Unsubscribe", "List-Post")
SYSTEM_SENDERS = frozenset({"mailer-daemon", "postmaster"})

# Subject prefixes as mail systems write them (with their colon), so a person's own subject
# such as "Out of office visit notes" is not mistaken for an auto-reply.
AUTO_REPLY_SUBJECT = re.compile(
    r"^(automatic reply|auto[- ]?reply|out of office( autoreply)?|abwesenheitsnotiz"
    r"|automatische antwort|réponse automatique|respuesta automática|risposta automatica"
    r"|automatisch antwoord|automatyczna odpowiedź|autosvar|resposta automática)\s*:"
    # Lotus Notes: "AUTO: Jane Doe is out of the office"; "Auto:" alone is too common.
    r"|^auto:.*\bout of (the )?office\b"
)
# Looser than AUTO_REPLY_SUBJECT (no colon needed), so only trusted together with
# X-Auto-Response-Suppress: "Out of Office", "Out of office - back Monday", "Jane is out of
# the office" — but not "Out of office visit notes", which a person wrote.
AUTO_REPLY_HINT = re.compile(
    r"^(?:out of (?:the )?office|ooo|automatic reply|auto[- ]?reply|autoreply|on vacation"
    r"|vacation reply|away from (?:the )?office|abwesend|abwesenheit|absence"
    r"|réponse automatique|respuesta automática|fuera de la oficina|risposta automatica)"
    r"(?:\s*[:\-–(]|\s*$)"
    r"|\bis (?:currently )?(?:out of (?:the )?office|on vacation|away)\b")
BOUNCE_SUBJECT = re.compile(
    r"^(undeliverable:|undelivered mail returned to sender|delivery status notification"
    r"|mail delivery failed|returned mail:|failure notice)"
)


def _header(msg, name: str) -> str:
    """The first value of header `name`, whitespace collapsed; "" if absent or unreadable."""
    try:
        value = msg.get(name)
        return "" if value is None else " ".join(str(value).split())
    except Exception:  # hostile header values can trip the stdlib's structured parsers
        return ""


def _present(msg, name: str) -> bool:
    try:
        return name in msg
    except Exception:
        return False


def _from_addresses(msg) -> list[str]:
    try:
        values = [str(v) for v in msg.get_all("From") or []]
        return [a.lower() for _, a in email.utils.getaddresses(values) if "@" in a]
    except Exception:
        return []


def _first_token(value: str) -> str:
    # "auto-replied (vacation)" and "bulk; comment" both reduce to their keyword.
    return re.split(r"[\s;(]", value.strip(), maxsplit=1)[0].lower()


def _without_tag(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"{local.split('+', 1)[0]}@{domain}"


# --- the checks: each returns a reason or None ---------------------------------------------


def null_sender(msg, envelope_from: str | None, settings) -> str | None:
    # MAIL FROM:<> is what bounces and other notifications use (RFC 5321 4.5.5).
    if envelope_from is None:  # no SMTP envelope (IMAP): the delivering MTA recorded it
        if not _present(msg, "Return-Path"):
            return None
        envelope_from = _header(msg, "Return-Path")
    return "null-sender" if envelope_from.strip() in ("", "<>") else None


def own_address_loop(msg, envelope_from: str | None, settings) -> str | None:
    own = {settings.addresses.sharing.lower(), settings.outbound.from_.lower()}
    reply_domain = settings.addresses.reply_domain.lower()
    senders = _from_addresses(msg) + [(envelope_from or "").strip().strip("<>").lower()]
    for address in senders:
        if _without_tag(address) in own or address.rpartition("@")[2] == reply_domain:
            return "own-address-loop"
    return None


def auto_submitted(msg, envelope_from: str | None, settings) -> str | None:
    value = _first_token(_header(msg, "Auto-Submitted"))
    return "auto-submitted" if value and value != "no" else None


def delivery_report(msg, envelope_from: str | None, settings) -> str | None:
    # multipart/report covers DSNs, read receipts (MDN) and abuse feedback alike.
    try:
        if msg.get_content_type() == "multipart/report":
            return "delivery-report"
    except Exception:
        pass
    return "delivery-report" if any(_present(msg, h) for h in BOUNCE_HEADERS) else None


def auto_reply_header(msg, envelope_from: str | None, settings) -> str | None:
    for name in AUTO_REPLY_HEADERS:
        if _present(msg, name) and _first_token(_header(msg, name)) not in ("no", "false"):
            return "auto-reply-header"
    if _first_token(_header(msg, "X-Apple-Action")) == "vacation":
        return "auto-reply-header"
    return None


def precedence(msg, envelope_from: str | None, settings) -> str | None:
    for name in ("Precedence", "X-Precedence"):
        value = _first_token(_header(msg, name))
        if value in ("bulk", "junk", "list", "auto_reply"):
            return f"precedence-{value.replace('_', '-')}"
    return None


def suppressed_auto_reply(msg, envelope_from: str | None, settings) -> str | None:
    # Exchange marks ordinary mail with X-Auto-Response-Suppress too, so the header counts
    # only together with a subject that reads like an auto-reply anywhere in it.
    if not _present(msg, "X-Auto-Response-Suppress"):
        return None
    subject = unicodedata.normalize("NFC", _header(msg, "Subject")).casefold()
    return "auto-reply-suppressed" if AUTO_REPLY_HINT.search(subject) else None


def mailing_list(msg, envelope_from: str | None, settings) -> str | None:
    return "mailing-list" if any(_present(msg, h) for h in LIST_HEADERS) else None


def system_sender(msg, envelope_from: str | None, settings) -> str | None:
    for address in _from_addresses(msg):
        if address.rpartition("@")[0] in SYSTEM_SENDERS:
            return "system-sender"
    return None


def subject_marker(msg, envelope_from: str | None, settings) -> str | None:
    subject = unicodedata.normalize("NFC", _header(msg, "Subject")).casefold()
    if AUTO_REPLY_SUBJECT.search(subject):
        return "auto-reply-subject"
    if BOUNCE_SUBJECT.search(subject):
        return "bounce-subject"
    return None


# Most specific evidence first, so the logged reason is the most telling one.
CHECKS: tuple[Callable[..., str | None], ...] = (
    null_sender,
    own_address_loop,
    auto_submitted,
    delivery_report,
    auto_reply_header,
    precedence,
    mailing_list,
    system_sender,
    subject_marker,
    suppressed_auto_reply,
)


def screen(msg, envelope_from: str | None, settings) -> Ignore | None:
    """Ignore(reason) if the message must not trigger any action or reply; None otherwise.

    `envelope_from` is the SMTP MAIL FROM ("" for <>); None when there was no envelope
    (IMAP), in which case the Return-Path header stands in for it.
    """
    for check in CHECKS:
        reason = check(msg, envelope_from, settings)
        if reason:
            return Ignore(reason)
    return None
