"""Reads a share request out of an e-mail: recipients, title, the sender's note, documents.

Pure functions (no database, no network). Untrusted input: nothing here may raise on a
malformed message; problems the member can fix come back as a typed `Reject`. The work is
done in mime, text, recipients, note and attachments; this module puts it together.
"""

from __future__ import annotations

import email.message
import unicodedata
from dataclasses import dataclass

from mailbridge.mail.attachments import Attachment, find_attachments
from mailbridge.mail.mime import header_text
from mailbridge.mail.note import sender_note
from mailbridge.mail.recipients import find_recipients
from mailbridge.outcomes import Reject
from mailbridge.settings import Settings

MAX_TITLE_CHARS = 500

_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@dataclass(frozen=True)
class ParsedShare:
    recipients: list[str]
    title: str
    note_html: str
    attachments: list[Attachment]


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
    text = header_text(msg, "Subject")
    return _one_line(text)[:MAX_TITLE_CHARS].strip()


def _one_line(text: str) -> str:
    """Whitespace collapsed; control and bidi embedding/override characters dropped."""
    text = "".join(" " if ch.isspace() else ch for ch in text)
    text = "".join(ch for ch in text
                   if unicodedata.category(ch) not in ("Cc", "Cs") and ch not in _BIDI_CONTROLS)
    return " ".join(text.split())
