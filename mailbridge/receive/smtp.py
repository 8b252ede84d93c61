"""SMTP intake (aiosmtpd): refuse what we can during the dialogue, spool and commit the rest
before answering 250. Database work runs in a thread pool, never on the event loop."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from email.parser import BytesHeaderParser
from email.policy import default as default_policy

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from mailbridge import db, members, senders, spool
from mailbridge.route import Route, classify_address
from mailbridge.runtime import Runtime
from mailbridge.storage import StorageError, StorageFull

log = logging.getLogger(__name__)

HEADER_LIMIT = 1024 * 1024  # more header than this is not a message we will share

# Named replies, so tests and operators can grep for them.
OK = "250 2.0.0 Message accepted"
NO_SUCH_ADDRESS = "550 5.1.1 No such address here"
NOT_A_MEMBER = "550 5.7.1 Sender is not allowed to share through this service"
TOO_BIG = "552 5.3.4 Message too big for this service"
DATABASE_UNAVAILABLE = "451 4.3.0 Temporary failure, please try again later"
DISK_FULL = "452 4.3.1 Insufficient system storage, please try again later"


class IntakeSMTP(SMTP):
    """aiosmtpd answers oversize mail with a bare 552; we add the enhanced status code."""

    async def push(self, status: str) -> None:
        if status.startswith("552 Error"):
            status = TOO_BIG
        await super().push(status)


class IntakeHandler:
    def __init__(self, runtime: Runtime, executor: ThreadPoolExecutor) -> None:
        self.runtime = runtime
        self.executor = executor

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if classify_address(address, self.runtime.settings) is None:
            return NO_SUCH_ADDRESS
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.accept, envelope.mail_from or "",
                                          list(envelope.rcpt_tos), envelope.original_content,
                                          client_ip(session), protocol(session))

    def accept(self, mail_from: str, rcpt_tos: list[str], raw: bytes, client: str = "",
               proto: str = "SMTP") -> str:
        """Runs in a worker thread: member check, then spool and commit."""
        settings = self.runtime.settings
        needs_member = any(classify_address(a, settings) in (Route.SHARE, Route.REPLY)
                           for a in rcpt_tos)
        try:
            if needs_member and not self._from_member(raw):
                log.info("smtp: refused a message from a non-member")
                return NOT_A_MEMBER
            row = spool.enqueue(self.runtime, raw, channel="smtp", envelope_from=mail_from,
                                envelope_to=rcpt_tos, client_ip=client, protocol=proto)
        except StorageFull:
            log.error("smtp: spool storage is full; answered 452")
            return DISK_FULL
        except (*db.UNAVAILABLE, StorageError) as exc:
            log.error("smtp: could not spool (%s); answered 451", type(exc).__name__)
            return DATABASE_UNAVAILABLE
        except Exception:
            log.exception("smtp: unexpected error while spooling; answered 451")
            return DATABASE_UNAVAILABLE
        log.info("smtp: accepted inbound #%d (%d bytes)", row.id, len(raw))
        return OK

    @staticmethod
    def _from_member(raw: bytes) -> bool:
        # Headers only, and only the header bytes: the parser would otherwise decode the whole
        # (possibly 80 MB) message into a string just to read From.
        ends = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0]
        head = raw[:min(ends, default=len(raw)) + 4][:HEADER_LIMIT]
        headers = BytesHeaderParser(policy=default_policy).parsebytes(head)
        return members.find_active(senders.from_address(headers)) is not None


def client_ip(session) -> str:
    peer = getattr(session, "peer", None)
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


def protocol(session) -> str:
    """The RFC 3848 protocol name for the Received header and the audit trail."""
    extended = getattr(session, "extended_smtp", False)
    if getattr(session, "ssl", None) is not None:
        return "ESMTPS" if extended else "SMTPS"
    return "ESMTP" if extended else "SMTP"


class IntakeController(Controller):
    def factory(self):
        return IntakeSMTP(self.handler, **self.SMTP_kwargs)


def make_controller(runtime: Runtime, executor: ThreadPoolExecutor) -> IntakeController:
    settings = runtime.settings
    return IntakeController(
        IntakeHandler(runtime, executor), hostname=settings.smtp.host, port=settings.smtp.port,
        data_size_limit=settings.smtp.max_message_bytes, enable_SMTPUTF8=True,
        ident="mailbridge", server_hostname=settings.sharing_domain)
