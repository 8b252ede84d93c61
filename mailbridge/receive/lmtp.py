"""LMTP intake for an MTA in front (Postfix's `lmtp:` transport), on a TCP port or a Unix
socket: the SMTP intake's checks and its spool-before-answer rule, with LMTP's one answer per
recipient after DATA (RFC 2033), so the MTA knows the fate of each recipient on its own."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from aiosmtpd.controller import Controller, UnixSocketController
from aiosmtpd.lmtp import LMTP

from mailbridge.receive.smtp import IntakeHandler, IntakeSMTP, count
from mailbridge.runtime import Runtime


class IntakeLMTP(IntakeSMTP, LMTP):
    """LHLO instead of HELO/EHLO (from aiosmtpd's LMTP); the header watch and enhanced status
    codes of the SMTP intake."""


class LmtpHandler(IntakeHandler):
    channel = "lmtp"

    def protocol(self, session) -> str:
        return "LMTPS" if getattr(session, "ssl", None) is not None else "LMTP"

    async def handle_DATA(self, server, session, envelope):
        """The message is spooled once for all its recipients; the outcome is then told for
        each, in the order of RCPT, as LMTP requires."""
        status = await super().handle_DATA(server, session, envelope)
        count(self, status, times=len(envelope.rcpt_tos))  # the joined answer is not counted
        return "\r\n".join(per_recipient(status, rcpt) for rcpt in envelope.rcpt_tos)


def per_recipient(status: str, recipient: str) -> str:
    """"250 2.0.0 Message accepted" for one recipient: "250 2.0.0 <a@b> Message accepted"."""
    code, enhanced, text = (status.split(" ", 2) + ["", ""])[:3]
    return f"{code} {enhanced} <{recipient}> {text}".rstrip()


class _TcpController(Controller):
    def factory(self):
        return IntakeLMTP(self.handler, **self.SMTP_kwargs)


class _UnixController(UnixSocketController):
    def factory(self):
        return IntakeLMTP(self.handler, **self.SMTP_kwargs)


def make_lmtp_controller(runtime: Runtime, executor: ThreadPoolExecutor) -> Controller:
    """The listener on `[lmtp] socket`, else `[lmtp] host`/`port`."""
    settings = runtime.settings
    common = dict(data_size_limit=settings.smtp.max_message_bytes, enable_SMTPUTF8=True,
                  ident="mailbridge", server_hostname=settings.sharing_domain)
    handler = LmtpHandler(runtime, executor)
    if settings.lmtp.socket:
        return _UnixController(handler, unix_socket=settings.lmtp.socket, **common)
    return _TcpController(handler, hostname=settings.lmtp.host, port=settings.lmtp.port,
                          **common)
