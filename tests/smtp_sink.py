"""A real SMTP server for tests (aiosmtpd in a thread) that keeps every message it accepts,
and can refuse chosen recipients or answer 451 to the first few deliveries."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

from aiosmtpd.controller import Controller

from tests.ports import free_port  # noqa: F401 (imported from here by tests)


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    message: EmailMessage
    at: float = 0.0  # time.monotonic() when it was accepted
    peer: tuple = ()  # the client's (address, port): one per connection


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower() in self.sink.refuse:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.sink.delay_seconds:  # a slow relay, without holding up other sessions
            await asyncio.sleep(self.sink.delay_seconds)
        return self.sink._accept(envelope.mail_from, list(envelope.rcpt_tos),
                                 bytes(envelope.original_content or envelope.content),
                                 tuple(session.peer or ()))


class SmtpSink:
    """Use as `with SmtpSink() as sink:`; `sink.port` is where it listens.

    refuse: recipients answered `550 5.1.1` at RCPT.
    tempfail_first: how many DATA commands are answered `451` before messages are accepted.
    tls: a server context; the sink then offers STARTTLS, or with `implicit` speaks TLS from
    the start. `host` and `port` (else a free one): where to listen.
    delay_seconds: how long each DATA takes before it is answered (a slow relay).
    on_message: called with each accepted message before the 250 is sent (to inject faults
    at the moment a relay has a message).
    """

    def __init__(self, *, refuse: Iterable[str] = (), tempfail_first: int = 0,
                 tls: ssl.SSLContext | None = None, implicit: bool = False,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port()
        self.refuse = {a.lower() for a in refuse}
        self.tempfail_left = tempfail_first
        self.attempts = 0  # DATA commands seen, accepted or not
        self.delay_seconds = 0.0
        self.on_message: Callable[[Received], None] | None = None
        self._received: list[Received] = []
        self._cond = threading.Condition()
        tls_options = {}
        if tls is not None:
            tls_options = {"ssl_context": tls} if implicit else {"tls_context": tls}
        self._controller = Controller(_Handler(self), hostname=self.host, port=self.port,
                                      **tls_options)

    @property
    def messages(self) -> list[Received]:
        with self._cond:
            return list(self._received)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """Block until at least `count` messages arrived; raises TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self._received)} of {count} messages arrived")
                self._cond.wait(left)
            return list(self._received)

    def start(self) -> SmtpSink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def connections(self) -> int:
        """How many client connections the accepted messages came over."""
        return len({m.peer for m in self.messages})

    def _accept(self, mail_from: str, rcpt_tos: list[str], raw: bytes, peer: tuple = ()) -> str:
        with self._cond:
            self.attempts += 1
            if self.tempfail_left > 0:
                self.tempfail_left -= 1
                return "451 4.3.0 Temporary failure, try again later"
            message = BytesParser(policy=policy.default).parsebytes(raw)
            received = Received(mail_from, rcpt_tos, raw, message, time.monotonic(), peer)
            self._received.append(received)
            self._cond.notify_all()
        if self.on_message is not None:
            self.on_message(received)
        return "250 Message accepted for delivery"
