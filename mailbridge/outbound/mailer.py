"""Transports that hand a rendered message to the world: an SMTP relay, or a local Maildir for
trying mailbridge out without a mail server.

The relay is reached over TLS with a verified certificate unless `[outbound.smtp] tls =
"none"`; even then, mail carrying PHI goes out in clear only to a relay on this machine."""

from __future__ import annotations

import ipaddress
import mailbox
import re
import smtplib
import ssl
from collections.abc import Callable
from email import policy
from email.parser import BytesParser
from pathlib import Path

from mailbridge.config import ConfigError, read_relay_password
from mailbridge.settings import RelaySettings, Settings

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


class HeldBack(TransientFailure):
    """Not even tried: the configuration forbids sending this message this way (PHI in clear).
    It waits, without using up its attempts, until a restart with a fixed configuration."""


def is_loopback(host: str) -> bool:
    """A relay on this machine: 127.0.0.0/8, ::1 or "localhost". Other names are not looked
    up: what DNS says about them is not something to bet PHI on."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def phi_in_clear_refused(relay: RelaySettings) -> bool:
    """True when mail carrying PHI must not go to this relay: no TLS, and not on loopback."""
    return relay.tls_mode == "none" and not is_loopback(relay.host)


def relay_tls_context(relay: RelaySettings) -> ssl.SSLContext | None:
    """Certificate and host-name verification against `ca_file`, else the system's CAs."""
    if relay.tls_mode == "none":
        return None
    try:
        return ssl.create_default_context(cafile=relay.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[outbound.smtp] ca_file: cannot use {relay.ca_file} as CA "
                          f"certificates ({exc})") from None


class SmtpMailer:
    """Sends through the configured relay. The connection is kept for the next message (a
    batch of sends shares one), probed with RSET before it is used again and replaced when
    that fails; any error while sending closes it. `close` ends it (QUIT). One mailer per
    sending thread: the connection is not shared."""

    def __init__(self, relay: RelaySettings, *, password: str = "",
                 helo_name: str | None = None) -> None:
        self.relay = relay
        self._password = password
        # Without a name smtplib asks DNS for this host's FQDN, which can stall for seconds.
        self.helo_name = helo_name
        self.tls_context = relay_tls_context(relay)
        self._smtp: smtplib.SMTP | None = None

    def send(self, envelope_from: str, to_addr: str, raw: bytes,
             on_accepted: Accepted = None, *, carries_phi: bool = True) -> None:
        relay = self.relay
        if carries_phi and phi_in_clear_refused(relay):
            raise HeldBack(f"held: [outbound.smtp] tls = \"none\" and the relay {relay.host} "
                           f"is not on loopback; mail carrying PHI is never sent in clear"
                           [:MAX_REASON_CHARS])
        options = [] if envelope_from.isascii() and to_addr.isascii() else ["SMTPUTF8"]
        try:
            smtp = self._session()
            if options and not smtp.has_extn("smtputf8"):
                raise PermanentFailure("the relay cannot send to international "
                                       "(SMTPUTF8) addresses")
            smtp.sendmail(envelope_from, [to_addr], raw, mail_options=options)
        except BaseException as exc:
            # A connection in an unknown state is never used again. Refusals of this one
            # message leave it usable, but a new connection costs little beside a lost one.
            self.close()
            raise self._failure(exc) from None
        if on_accepted is not None:  # before QUIT: a crash there must not resend
            on_accepted()

    def close(self) -> None:
        """End the kept connection (QUIT), if there is one; errors are of no consequence."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()

    def _session(self) -> smtplib.SMTP:
        """The kept connection if the relay still answers RSET, else a new one, ready for
        MAIL FROM (TLS and login done)."""
        if self._smtp is not None:
            try:
                if self._smtp.rset()[0] == 250:
                    return self._smtp
            except (smtplib.SMTPException, OSError):
                pass  # idle too long, or the relay restarted: connect again
            self.close()
        relay = self.relay
        smtp = self._connect()
        try:
            if relay.tls_mode == "starttls":
                smtp.ehlo_or_helo_if_needed()
                if not smtp.has_extn("starttls"):
                    raise TransientFailure("the relay does not offer STARTTLS, and "
                                           "[outbound.smtp] tls = \"starttls\" forbids "
                                           "sending in clear")
                smtp.starttls(context=self.tls_context)
            if relay.username:
                smtp.login(relay.username, self._password)
            smtp.ehlo_or_helo_if_needed()
        except BaseException:
            smtp.close()
            raise
        self._smtp = smtp
        return smtp

    @staticmethod
    def _failure(exc: BaseException) -> BaseException:
        """What a failed send means for the message: permanent, transient, or not ours."""
        if isinstance(exc, DeliveryError) or not isinstance(exc, Exception):
            return exc
        if isinstance(exc, smtplib.SMTPRecipientsRefused):
            code, text = next(iter(exc.recipients.values()))
            return _by_code(code, text, "recipient refused")
        if isinstance(exc, smtplib.SMTPDataError):
            return _by_code(exc.smtp_code, exc.smtp_error, "message refused")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return TransientFailure(f"the relay's TLS certificate is not trusted "
                                    f"({exc.verify_message}); see [outbound.smtp] ca_file"
                                    [:MAX_REASON_CHARS])
        if isinstance(exc, smtplib.SMTPNotSupportedError):
            return TransientFailure(f"relay lacks a needed extension ({exc})")
        if isinstance(exc, smtplib.SMTPResponseException):
            # MAIL FROM or login refused: our configuration, not this message; retry.
            return TransientFailure(_reason(exc.smtp_code, exc.smtp_error, "relay refused"))
        if isinstance(exc, (smtplib.SMTPException, OSError)):
            return TransientFailure(f"relay unreachable ({type(exc).__name__}: "
                                    f"{exc})"[:MAX_REASON_CHARS])
        return exc

    def _connect(self) -> smtplib.SMTP:
        relay = self.relay
        if relay.tls_mode == "implicit":
            return smtplib.SMTP_SSL(relay.host, relay.port, local_hostname=self.helo_name,
                                    timeout=relay.timeout_seconds, context=self.tls_context)
        return smtplib.SMTP(relay.host, relay.port, local_hostname=self.helo_name,
                            timeout=relay.timeout_seconds)


class MaildirMailer:
    """Writes each message into a Maildir (atomically: tmp/ then new/), for local use."""

    def __init__(self, path: str | Path, *, base_url: str) -> None:
        self.path = Path(path)
        self._link = re.compile(re.escape(base_url.rstrip("/")) + r"/(?:s|reset)/[A-Za-z0-9_\-]+")

    def send(self, envelope_from: str, to_addr: str, raw: bytes,
             on_accepted: Accepted = None, *, carries_phi: bool = True) -> None:
        # What a delivering MTA adds, so a reader of the Maildir sees the envelope.
        trace = f"Return-Path: <{envelope_from}>\nDelivered-To: {to_addr}\n".encode()
        try:
            mailbox.Maildir(self.path, create=True).add(trace + raw.replace(b"\r\n", b"\n"))
        except OSError as exc:
            raise TransientFailure(f"cannot write to the maildir ({type(exc).__name__})") \
                from None
        if on_accepted is not None:
            on_accepted()

    def close(self) -> None:
        """Nothing is kept open."""

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
