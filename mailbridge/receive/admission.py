"""Who may hand us a message at all, decided the same way for every intake (SMTP, IMAP, and
an MTA's policy queries): mail to the sharing or a reply address must come from an active
member (the header From); mail to other addresses of ours (bounces) from anyone. This is the
early check: the pipeline authenticates the member afterwards."""

from __future__ import annotations

from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import default as default_policy

from mailbridge.mail import senders
from mailbridge.mail.mime import header_end
from mailbridge.mail.route import Route, classify_address
from mailbridge.settings import Settings
from mailbridge.shares import members

HEADER_LIMIT = 1024 * 1024  # more header than this is not a message we will share


def needs_member(rcpts: list[str], settings: Settings) -> bool:
    return any(classify_address(a, settings) in (Route.SHARE, Route.REPLY) for a in rcpts)


def sender_allowed(rcpts: list[str], headers: Message, settings: Settings) -> bool:
    return (not needs_member(rcpts, settings)
            or members.find_active(senders.from_address(headers)) is not None)


def header_of(raw: bytes) -> Message:
    """The header fields of `raw`, parsed from the header bytes only: the parser would
    otherwise decode a whole (possibly 80 MB) message into a string just to read From."""
    head = raw[:header_end(raw)][:HEADER_LIMIT]
    return BytesHeaderParser(policy=default_policy).parsebytes(head)
