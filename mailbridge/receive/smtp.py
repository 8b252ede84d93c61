"""SMTP intake (aiosmtpd): refuse what we can during the dialogue, spool and commit the rest
before answering 250. Database work runs in a thread pool, never on the event loop.

With a certificate, the listener offers STARTTLS (and can insist on it), and a second listener
can speak TLS from the first byte (implicit TLS, port 465 style)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from mailbridge.mail import senders
from mailbridge.mail.route import classify_address
from mailbridge.receive import admission, limits, spool
from mailbridge.receive.header_watch import HeaderWatch
from mailbridge.receive.tls import ServerCertificate
from mailbridge.receive.trace import received_header
from mailbridge.runtime import Runtime
from mailbridge.store import db
from mailbridge.store.blobs import StorageError, StorageFull

log = logging.getLogger(__name__)

# Named replies, so tests and operators can grep for them.
OK = "250 2.0.0 Message accepted"
NO_SUCH_ADDRESS = "550 5.1.1 No such address here"
NOT_A_MEMBER = "550 5.7.1 Sender is not allowed to share through this service"
TOO_BIG = "552 5.3.4 Message too big for this service"
DATABASE_UNAVAILABLE = "451 4.3.0 Temporary failure, please try again later"
DISK_FULL = "452 4.3.1 Insufficient system storage, please try again later"
TLS_REQUIRED = "530 5.7.0 Must issue a STARTTLS command first"

# What each of those replies counts as in the metrics (the reply, not the client's words).
OUTCOMES = {OK: "accepted", NO_SUCH_ADDRESS: "no_such_address", NOT_A_MEMBER: "not_a_member",
            TOO_BIG: "too_big", limits.OVER_BUDGET: "over_budget",
            DATABASE_UNAVAILABLE: "database_unavailable", DISK_FULL: "disk_full",
            TLS_REQUIRED: "tls_required"}


def count(handler, status: str, times: int = 1) -> None:
    """Every reply that accepts or refuses a message passes here, once."""
    outcome = OUTCOMES.get(status)
    if outcome is None:
        return
    for _ in range(times):
        if outcome == "accepted":
            handler.runtime.metrics.accepted(handler.channel)
        else:
            handler.runtime.metrics.refused(handler.channel, outcome)


class IntakeSMTP(SMTP):
    """aiosmtpd's own refusals lack enhanced status codes (RFC 3463); we add them. During DATA
    the header is watched, so a non-member's message is refused without its body."""

    async def push(self, status: str) -> None:
        if status.startswith("552 Error"):
            status = TOO_BIG
        elif status.startswith("530 Must issue a STARTTLS"):
            status = TLS_REQUIRED
        count(self.event_handler, status)
        await super().push(status)

    async def smtp_DATA(self, arg: str) -> None:
        reader, envelope = self._reader, self.envelope

        async def decide(header: bytes) -> str | None:
            envelope.refusal = await self.event_handler.early_refusal(envelope, header)
            return envelope.refusal

        self._reader = HeaderWatch(reader, decide)
        try:
            await super().smtp_DATA(arg)
        finally:
            self._reader = reader

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # aiosmtpd notes TLS only after STARTTLS; on the implicit-TLS listener the connection
        # is TLS from the start, and the Received header must say so.
        if self.session.ssl is None and transport.get_extra_info("ssl_object") is not None:
            self.session.ssl = {name: transport.get_extra_info(name)
                                for name in ("ssl_object", "cipher", "peercert")}


class IntakeHandler:
    channel = "smtp"  # the spool's name for this intake

    def __init__(self, runtime: Runtime, executor: ThreadPoolExecutor) -> None:
        self.runtime = runtime
        self.executor = executor
        # Concurrent sessions' rows share one commit (one fsync); each still answers 250 only
        # once its own row is committed, and 451 if that group's commit failed.
        self.spool = spool.GroupCommit(runtime)

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        """Past its hourly budget a client (or envelope sender) is asked to come back later,
        before it sends anything big."""
        declared = next((int(o[5:]) for o in mail_options
                         if o.startswith("SIZE=") and o[5:].isdigit()), 0)
        loop = asyncio.get_running_loop()
        over = await loop.run_in_executor(self.executor, self._over_budget, client_ip(session),
                                          address or "", declared)
        if over:
            log.info("smtp: a client is over its hourly budget; answered 451")
            return limits.OVER_BUDGET
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    def _over_budget(self, ip: str, sender: str, size: int) -> bool:
        """False when the database cannot tell now: the answer after DATA will say 451."""
        exempt = senders.headers_trusted(self.channel, ip, self.runtime.settings)
        try:
            return limits.over_budget(self.runtime, client_ip=ip, sender=sender,
                                      ip_exempt=exempt, incoming_bytes=size)
        except db.UNAVAILABLE:
            return False

    async def early_refusal(self, envelope, header: bytes) -> str | None:
        """While DATA is still arriving: the refusal for a non-member's message, else None
        (also when the database cannot answer now: handle_DATA decides then)."""
        if getattr(envelope, "refusal", None):
            return envelope.refusal
        loop = asyncio.get_running_loop()
        try:
            member = await loop.run_in_executor(self.executor, self._sender_allowed,
                                                list(envelope.rcpt_tos), header)
        except Exception:  # noqa: BLE001 - no early decision; the full check follows
            return None
        return None if member else NOT_A_MEMBER

    def _sender_allowed(self, rcpt_tos: list[str], raw: bytes) -> bool:
        return admission.sender_allowed(rcpt_tos, admission.header_of(raw),
                                        self.runtime.settings)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if classify_address(address, self.runtime.settings) is None:
            return NO_SUCH_ADDRESS
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if getattr(envelope, "refusal", None):
            log.info("smtp: refused a message from a non-member (body not kept)")
            return envelope.refusal
        loop = asyncio.get_running_loop()
        client, proto = client_ip(session), self.protocol(session)
        trace = received_header(helo=session.host_name, client_ip=client,
                                by=self.runtime.settings.sharing_domain, protocol=proto,
                                ssl_info=session.ssl)
        return await loop.run_in_executor(self.executor, self.accept, envelope.mail_from or "",
                                          list(envelope.rcpt_tos), envelope.original_content,
                                          client, proto, trace)

    def protocol(self, session) -> str:
        return protocol(session)

    def accept(self, mail_from: str, rcpt_tos: list[str], raw: bytes, client: str = "",
               proto: str = "SMTP", trace: bytes = b"") -> str:
        """Runs in a worker thread: member check, then spool and commit (with `trace`, the
        Received header, on top)."""
        settings = self.runtime.settings
        try:
            if not self._sender_allowed(rcpt_tos, raw):
                log.info("smtp: refused a message from a non-member")
                return NOT_A_MEMBER
            exempt = senders.headers_trusted(self.channel, client, settings)
            if limits.over_budget(self.runtime, client_ip=client, sender=mail_from,
                                  ip_exempt=exempt, incoming_bytes=len(raw)):
                log.info("smtp: a client is over its hourly budget; answered 451")
                return limits.OVER_BUDGET
            row = self.spool.enqueue(trace + raw, channel=self.channel, envelope_from=mail_from,
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
        log.info("%s: accepted inbound #%d (%d bytes, %s)", self.channel, row.id, len(raw),
                 proto)
        return OK



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


def make_controller(runtime: Runtime, executor: ThreadPoolExecutor,
                    certificate: ServerCertificate | None = None) -> IntakeController:
    """The listener on `[smtp] port`; with a certificate it offers STARTTLS."""
    settings = runtime.settings
    tls = {"tls_context": certificate.context,
           "require_starttls": settings.smtp.require_tls} if certificate else {}
    return IntakeController(
        IntakeHandler(runtime, executor), hostname=settings.smtp.host, port=settings.smtp.port,
        data_size_limit=settings.smtp.max_message_bytes, enable_SMTPUTF8=True,
        ident="mailbridge", server_hostname=settings.sharing_domain, **tls)


def make_implicit_tls_controller(runtime: Runtime, executor: ThreadPoolExecutor,
                                 certificate: ServerCertificate) -> IntakeController:
    """The listener on `[smtp] implicit_tls_port`: TLS from the first byte."""
    settings = runtime.settings
    return IntakeController(
        IntakeHandler(runtime, executor), hostname=settings.smtp.host,
        port=settings.smtp.implicit_tls_port, ssl_context=certificate.context,
        data_size_limit=settings.smtp.max_message_bytes, enable_SMTPUTF8=True,
        ident="mailbridge", server_hostname=settings.sharing_domain)
