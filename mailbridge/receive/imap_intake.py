"""What the IMAP poller does with one fetched message: the same rules as SMTP intake, and a
source key (mailbox, UIDVALIDITY, UID) so a message seen again is never spooled twice."""

from __future__ import annotations

import email.utils
import enum
import hashlib
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import default as default_policy

import peewee

from mailbridge.mail import identity
from mailbridge.mail.route import classify_address
from mailbridge.receive import admission, spool
from mailbridge.runtime import Runtime
from mailbridge.settings import Settings
from mailbridge.store.models import InboundMessage, Share

# Delivery headers first: they name the address the provider delivered to.
ENVELOPE_HEADERS = ("Delivered-To", "X-Original-To", "To", "Cc")


class Verdict(enum.Enum):
    SPOOLED = "spooled"            # new: the pipeline takes it from here
    ALREADY = "already spooled"    # seen before (a crash before the move, or another poller)
    REPEAT = "repeat"              # same content spooled under an earlier UIDVALIDITY
    NON_MEMBER = "non-member"      # like SMTP's 550: no reply, nothing stored
    TOO_BIG = "too big"            # like SMTP's 552
    UNREADABLE = "unreadable"      # spooled as failed for the operator

    @property
    def failed(self) -> bool:
        """True when the message belongs in the failed folder."""
        return self in (Verdict.NON_MEMBER, Verdict.TOO_BIG, Verdict.UNREADABLE)


@dataclass(frozen=True)
class Mailbox:
    """Names the watched folder in source keys: imap:<user>@<host>/<folder>:<uidvalidity>:<uid>."""

    username: str
    host: str
    folder: str

    @property
    def prefix(self) -> str:
        return f"imap:{self.username.lower()}@{self.host.lower()}/{self.folder}:"

    def key(self, uidvalidity: int, uid: int) -> str:
        return f"{self.prefix}{uidvalidity}:{uid}"


def uidvalidity_changed(mailbox: Mailbox, uidvalidity: int) -> bool:
    """True when the last message spooled from this folder carried another UIDVALIDITY: the
    server renumbered the folder, so UIDs no longer tell which messages we already have."""
    last = (InboundMessage.select(InboundMessage.source_key)
            .where(InboundMessage.source_key.startswith(mailbox.prefix))
            .order_by(InboundMessage.id.desc()).first())
    return last is not None and not last.source_key.startswith(f"{mailbox.prefix}{uidvalidity}:")


def unreadable(raw: bytes) -> str:
    """Why a message cannot be processed at all ("" if it can)."""
    if not raw.strip():
        return "imap: the message is empty"
    try:
        headers = BytesHeaderParser(policy=default_policy).parsebytes(raw)
    except Exception:  # the stdlib parser rarely raises, but hostile input can make it
        return "imap: the message header cannot be parsed"
    if not headers.keys():
        return "imap: the message has no header fields"
    return ""


def envelope_to(headers: Message, settings: Settings) -> list[str]:
    """Our addresses among the delivery and address headers (so replies and plus-addressed
    shares route as over SMTP); the sharing address when none is ours (e.g. a Bcc)."""
    found: list[str] = []
    for name in ENVELOPE_HEADERS:
        try:
            values = [str(v) for v in headers.get_all(name) or []]
            addresses = [a for _, a in email.utils.getaddresses(values)]
        except Exception:  # hostile header values can trip the stdlib's parsers
            continue
        for address in addresses:
            address = address.strip().lower()
            if classify_address(address, settings) is not None and address not in found:
                found.append(address)
    return found or [settings.addresses.sharing.lower()]


def _spooled_before(raw: bytes, headers: Message) -> bool:
    digest = hashlib.sha256(raw).hexdigest()
    same_bytes = InboundMessage.select().where((InboundMessage.channel == "imap")
                                               & (InboundMessage.raw_sha256 == digest))
    return same_bytes.exists() or Share.select().where(
        Share.dedupe_key == identity.share_dedupe_key(raw, headers)).exists()


def take(runtime: Runtime, raw: bytes, key: str, *, check_content: bool) -> Verdict:
    """Decide about one message and spool it when it is new; the caller moves it afterwards.

    `check_content`: also look for the same message spooled under another source key (after
    a UIDVALIDITY change); the raw bytes or the Message-ID and body tell.
    """
    existing = InboundMessage.get_or_none(InboundMessage.source_key == key)
    if existing is not None:
        return Verdict.UNREADABLE if existing.outcome == "unreadable" else Verdict.ALREADY
    settings = runtime.settings
    reason = unreadable(raw)
    if reason:
        _spool(runtime, raw, key, [], reason)
        return Verdict.UNREADABLE
    headers = BytesHeaderParser(policy=default_policy).parsebytes(raw)
    to = envelope_to(headers, settings)
    if not admission.sender_allowed(to, headers, settings):
        return Verdict.NON_MEMBER
    if check_content and _spooled_before(raw, headers):
        return Verdict.REPEAT
    return Verdict.SPOOLED if _spool(runtime, raw, key, to, "") else Verdict.ALREADY


def _spool(runtime: Runtime, raw: bytes, key: str, to: list[str], reason: str) -> bool:
    """True when spooled; False when another poller spooled the same key first."""
    try:
        spool.enqueue(runtime, raw, channel="imap", envelope_from="", envelope_to=to,
                      source_key=key, unreadable=reason, protocol="IMAP")
    except peewee.IntegrityError:
        if InboundMessage.get_or_none(InboundMessage.source_key == key) is None:
            raise
        return False
    return True
