"""Transports that hand a rendered message to the world: an SMTP relay, or a local Maildir for
trying mailbridge out without a mail server."""

from __future__ import annotations

import mailbox
import re
import smtplib
import ssl
from collections.abc import Callable
from email import policy
from email.parser import BytesParser
from pathlib import Path

from mailbridge.config import RelaySettings, Settings, read_relay_password

MAX_REASON_CHARS = 300

# Called the moment the relay (or the Maildir) has the message, before the connection is
# closed: the caller records it as sent then, keeping the window for a duplicate small.
Accepted = Callable[[], None] | None


class DeliveryError(Exception):
    """A message could not be handed over; `reason` is safe to store (no message content)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PermanentFailure(DeliveryError):
    """The relay refused this message for good (5xx to RCPT or DATA): do not retry."""


class TransientFailure(DeliveryError):
    """Try again later: 4xx, relay unreachable, timeout, login or TLS trouble."""


class SmtpMailer:
    """Sends through the configured relay, one connection per message."""

    def __init__(self, relay: RelaySettings, *, password: str = "",
                 helo_name: str | None = None) -> None:
        self.relay = relay
        self._password = password
        # Without a name smtplib asks DNS for this host's FQDN, which can stall for seconds.
        self.helo_name = helo_name

    def send(self, envelope_from: str, to_addr: str, raw: bytes,
             on_accepted: Accepted = None) -> None:
        relay = self.relay
        options = [] if envelope_from.isascii() and to_addr.isascii() else ["SMTPUTF8"]
        try:
            with smtplib.SMTP(relay.host, relay.port, local_hostname=self.helo_name,
                              timeout=relay.timeout_seconds) as smtp:
                if relay.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if relay.username:
                    smtp.login(relay.username, self._password)
                smtp.ehlo_or_helo_if_needed()
                if options and not smtp.has_extn("smtputf8"):
                    raise PermanentFailure("the relay cannot send to international "
                                           "(SMTPUTF8) addresses")
                smtp.sendmail(envelope_from, [to_addr], raw, mail_options=options)
                if on_accepted is not None:  # before QUIT: a crash there must not resend
                    on_accepted()
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            raise _by_code(code, text, "recipient refused") from None
        except smtplib.SMTPDataError as exc:
            raise _by_code(exc.smtp_code, exc.smtp_error, "message refused") from None
        except smtplib.SMTPNotSupportedError as exc:
            raise TransientFailure(f"relay lacks a needed extension ({exc})") from None
        except smtplib.SMTPResponseException as exc:
            # MAIL FROM or login refused: our configuration, not this message; retry.
            raise TransientFailure(_reason(exc.smtp_code, exc.smtp_error,
                                           "relay refused")) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise TransientFailure(f"relay unreachable ({type(exc).__name__}: "
                                   f"{exc})"[:MAX_REASON_CHARS]) from None


class MaildirMailer:
    """Writes each message into a Maildir (atomically: tmp/ then new/), for local use."""

    def __init__(self, path: str | Path, *, base_url: str) -> None:
        self.path = Path(path)
        self._link = re.compile(re.escape(base_url.rstrip("/")) + r"/(?:s|reset)/[A-Za-z0-9_\-]+")

    def send(self, envelope_from: str, to_addr: str, raw: bytes,
             on_accepted: Accepted = None) -> None:
        # What a delivering MTA adds, so a reader of the Maildir sees the envelope.
        trace = f"Return-Path: <{envelope_from}>\nDelivered-To: {to_addr}\n".encode()
        try:
            mailbox.Maildir(self.path, create=True).add(trace + raw.replace(b"\r\n", b"\n"))
        except OSError as exc:
            raise TransientFailure(f"cannot write to the maildir ({type(exc).__name__})") \
                from None
        if on_accepted is not None:
            on_accepted()

    @staticmethod
    def subject(raw: bytes) -> str:
        return str(BytesParser(policy=policy.default).parsebytes(raw, headersonly=True)
                   .get("Subject", ""))

    def find_links(self, raw: bytes) -> list[str]:
        """The portal links in the message's text part, for printing to a local operator."""
        msg = BytesParser(policy=policy.default).parsebytes(raw)
        found: list[str] = []
        for part in msg.walk():
            if part.get_content_type() == "text/plain":
                found += [u for u in self._link.findall(part.get_content()) if u not in found]
        return found


def make_mailer(settings: Settings) -> SmtpMailer | MaildirMailer:
    if settings.outbound.transport == "smtp":
        return SmtpMailer(settings.outbound.smtp, password=read_relay_password(settings),
                          helo_name=settings.outbound.from_.rsplit("@", 1)[-1])
    return MaildirMailer(settings.outbound.maildir, base_url=settings.service.base_url)


def _by_code(code: int, text: bytes | str, what: str) -> DeliveryError:
    kind = PermanentFailure if 500 <= code < 600 else TransientFailure
    return kind(_reason(code, text, what))


def _reason(code: int, text: bytes | str, what: str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{what}: {code} {' '.join(text.split())}"[:MAX_REASON_CHARS]
