"""Attacks on the transport: exhausting the portal's connections, sending mail in clear where
TLS is required, commands smuggled into a TLS upgrade, headers forged through HELO, a relay
that is impersonated or strips TLS, and PHI handed to a relay in clear. Each test is named by
the attack and checks that nothing was created, sent or stored that should not have been."""

from __future__ import annotations

import dataclasses
import smtplib
import socket
import threading
import time
import urllib.request
from email import policy
from email.parser import BytesParser

import pytest

from mailbridge.config import load_settings
from mailbridge.outbound.dispatcher import dispatch_due
from mailbridge.outbound.mailer import make_mailer
from mailbridge.receive import spool
from mailbridge.runtime import build_runtime
from mailbridge.store.models import AuditEvent, InboundMessage, OutboundMessage, WebSession
from tests.conftest import SHARING, free_port
from tests.e2e.test_serve import ServeProcess, Setup, mailbridge
from tests.helpers import MEMBER, add_jane, share_message, wire
from tests.outbound.test_dispatcher import share_with_mail
from tests.smtp_sink import SmtpSink
from tests.tls_helpers import make_certificate, non_loopback_address, tls_intake


def nothing_spooled(runtime) -> bool:
    files = [p for p in runtime.settings.spool_dir.rglob("*") if p.is_file()]
    return InboundMessage.select().count() == 0 and not files


# --- the portal: connection exhaustion (slowloris) ------------------------------------------


@pytest.fixture
def portal(tmp_path):
    """A real `mailbridge serve` process with the shipped waitress settings."""
    web_port, smtp_port = free_port(), free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"""\
[service]
base_url = "http://portal.example"
data_dir = "data"
[smtp]
port = {smtp_port}
[web]
port = {web_port}
[metrics]
port = 0
[addresses]
sharing = "{SHARING}"
reply_domain = "reply.portal.example"
[outbound]
from = "mailbridge@portal.example"
""")
    setup = Setup(config, tmp_path / "data", smtp_port)
    mailbridge(setup, "init")
    process = ServeProcess(setup, "serve")
    try:
        process.wait_ready()
        yield setup, web_port
    finally:
        process.kill()


class StalledClients:
    """`count` connections that each send one more header line every `every` seconds and
    never finish their request (slowloris)."""

    def __init__(self, port: int, count: int, every: float = 2.0) -> None:
        self.sockets = []
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(f"GET /signin HTTP/1.1\r\nHost: portal.example\r\nX-Stall: {i}\r\n"
                      .encode())
            self.sockets.append(s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, args=(every,), daemon=True)
        self._thread.start()

    def _trickle(self, every: float) -> None:
        line = 0
        while not self._stop.wait(every):
            line += 1
            for s in self.sockets:
                try:
                    s.sendall(f"X-Line-{line}: still here\r\n".encode())
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.sockets:
            s.close()


def timed_get(url: str, timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our test URL
        return response.status, time.monotonic() - started


def test_slowloris_200_stalled_connections_do_not_starve_the_portal(portal):
    setup, web_port = portal
    url = f"http://127.0.0.1:{web_port}/healthz"
    assert timed_get(url, 5)[0] == 200
    stalled = StalledClients(web_port, 200)
    try:
        time.sleep(4.5)  # two trickle rounds: every stalled connection is in and active
        status, seconds = timed_get(url, 5)
        assert status == 200 and seconds < 4, f"healthz took {seconds:.1f} s"
        time.sleep(2.0)
        assert timed_get(url, 5)[0] == 200  # and still, a round later
    finally:
        stalled.close()
    # The half-sent requests reached no page: no session, no audit event.
    runtime = build_runtime(load_settings(setup.config, env={}))
    try:
        assert WebSession.select().count() == 0 and AuditEvent.select().count() == 0
    finally:
        runtime.db.close()


# --- intake: TLS required, STARTTLS command injection, HELO header injection ----------------


@pytest.fixture
def cert(tmp_path):
    return make_certificate(tmp_path / "tls", "intake")


def test_mail_in_clear_when_tls_is_required_is_refused_530_and_nothing_stored(runtime, cert):
    add_jane()
    with tls_intake(runtime, cert, require_tls=True) as intake:
        with smtplib.SMTP("127.0.0.1", intake.port, timeout=10) as smtp:
            smtp.ehlo("mail.clinic.example")
            assert smtp.has_extn("starttls")
            for command in (f"MAIL FROM:<{MEMBER}>", f"RCPT TO:<{SHARING}>", "DATA",
                            "HELO mail.clinic.example", "RSET"):
                assert smtp.docmd(command) == (
                    530, b"5.7.0 Must issue a STARTTLS command first"), command
            with pytest.raises(smtplib.SMTPSenderRefused) as info:
                smtp.sendmail(MEMBER, [SHARING], wire(share_message()))
            assert info.value.smtp_code == 530
        assert nothing_spooled(intake.runtime)


def read_reply(stream) -> bytes:
    """One SMTP reply (all its lines)."""
    lines = []
    while True:
        line = stream.readline()
        assert line, "connection closed"
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


def test_commands_smuggled_in_clear_with_starttls_are_discarded(runtime, cert):
    """CVE-2011-0411 style: plaintext commands pipelined after STARTTLS must not run inside
    the TLS session as if the client had sent them there."""
    add_jane()
    with tls_intake(runtime, cert, require_tls=True) as intake:
        raw = socket.create_connection(("127.0.0.1", intake.port), timeout=10)
        stream = raw.makefile("rb")
        assert read_reply(stream).startswith(b"220")
        raw.sendall(b"EHLO attacker.example\r\n")
        assert read_reply(stream).startswith(b"250")
        raw.sendall(f"STARTTLS\r\nMAIL FROM:<{MEMBER}>\r\nRCPT TO:<{SHARING}>\r\n".encode())
        assert read_reply(stream).startswith(b"220")
        stream.close()
        tls = cert.client_context().wrap_socket(raw, server_hostname="localhost")
        stream = tls.makefile("rb")
        tls.sendall(b"EHLO attacker.example\r\n")
        assert read_reply(stream).startswith(b"250")
        tls.sendall(b"DATA\r\n")
        assert read_reply(stream).startswith(b"503")  # no MAIL/RCPT carried over
        tls.close()
        assert nothing_spooled(intake.runtime)


def test_header_injection_through_helo_stays_inside_the_received_header(runtime, cert):
    add_jane()
    message = wire(share_message())
    with tls_intake(runtime, cert) as intake:
        raw = socket.create_connection(("127.0.0.1", intake.port), timeout=10)
        stream = raw.makefile("rb")
        assert read_reply(stream).startswith(b"220")
        # A bare CR is no line end to SMTP, but e-mail parsers break header lines on it.
        raw.sendall(b"EHLO evil.example\rX-Injected: yes\rAuthentication-Results: "
                    b"mx.portal.example; dkim=pass header.d=clinic.example\r\n")
        assert read_reply(stream).startswith(b"250")
        for command in (f"MAIL FROM:<{MEMBER}>", f"RCPT TO:<{SHARING}>", "DATA"):
            raw.sendall(command.encode() + b"\r\n")
            assert read_reply(stream)[:1] in (b"2", b"3")
        raw.sendall(message + b".\r\n")
        assert read_reply(stream).startswith(b"250")
        raw.sendall(b"QUIT\r\n")
        raw.close()
        stored = spool.read_raw(intake.runtime, InboundMessage.get())
    parsed = BytesParser(policy=policy.default).parsebytes(stored)
    original = BytesParser(policy=policy.default).parsebytes(message)
    assert parsed["X-Injected"] is None
    assert parsed.get_all("Authentication-Results") is None
    assert [k for k in parsed.keys() if k != "Received"] == list(original.keys())
    received, = parsed.get_all("Received")
    assert "\r" not in received and "\n" not in received
    assert received.startswith("from evil.exampleX-Injected:yesAuthentication-Results:")
    header_block = stored.split(b"\r\n\r\n", 1)[0]
    assert b"\r" not in header_block.replace(b"\r\n", b"")


# --- the relay: impersonated, stripping TLS, or in clear elsewhere ----------------------------


@pytest.fixture
def relay_runtime(runtime):
    """The test runtime sending through an SMTP relay configured by `relay(**changes)`."""

    def relay(**changes):
        smtp = dataclasses.replace(runtime.settings.outbound.smtp, timeout_seconds=5, **changes)
        outbound = dataclasses.replace(runtime.settings.outbound, transport="smtp", smtp=smtp)
        return dataclasses.replace(runtime, settings=dataclasses.replace(runtime.settings,
                                                                         outbound=outbound))

    return relay


def queued_reasons() -> list[str]:
    rows = OutboundMessage.select().order_by(OutboundMessage.id)
    assert all(r.state == "queued" for r in rows), [r.state for r in rows]
    return [r.last_error for r in rows]


@pytest.mark.parametrize("who", ["self-signed", "trusted CA, another host's name"])
def test_impersonated_relay_gets_no_mail(relay_runtime, tmp_path, who):
    if who == "self-signed":
        fake = make_certificate(tmp_path / "tls", "fake")
        ca_file = ""  # the system's CAs do not know it
    else:
        fake = make_certificate(tmp_path / "tls", "fake", names="DNS:relay.elsewhere.example")
        ca_file = str(fake.cert)
    with SmtpSink(tls=fake.server_context()) as sink:
        rt = relay_runtime(port=sink.port, tls="starttls", ca_file=ca_file)
        share_with_mail(rt, ["dr.smith@ortho.example"])
        counts = dispatch_due(rt, make_mailer(rt.settings))
        assert counts == {"sent": 0, "retried": 2, "failed": 0}
        assert sink.attempts == 0 and sink.messages == []
    assert all("certificate is not trusted" in r for r in queued_reasons())


def test_relay_stripping_starttls_gets_no_mail(relay_runtime):
    with SmtpSink() as sink:  # a man in the middle removes STARTTLS from the EHLO answer
        rt = relay_runtime(port=sink.port, tls="starttls")
        share_with_mail(rt, ["dr.smith@ortho.example"])
        assert dispatch_due(rt, make_mailer(rt.settings))["sent"] == 0
        assert sink.attempts == 0 and sink.messages == []
    assert all("does not offer STARTTLS" in r for r in queued_reasons())


def test_phi_in_clear_to_a_relay_elsewhere_is_held_not_sent(relay_runtime):
    address = non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback address here (test_dispatcher covers the decision)")
    with SmtpSink(host=address) as sink:
        rt = relay_runtime(host=address, port=sink.port, tls="none")
        share_with_mail(rt, ["dr.smith@ortho.example"])
        assert dispatch_due(rt, make_mailer(rt.settings)) == {"sent": 1, "retried": 1,
                                                              "failed": 0}
        got, = sink.wait_for(1)
        time.sleep(0.2)
        assert len(sink.messages) == 1
    assert got.rcpt_tos == ["dr.smith@ortho.example"]  # the link: no PHI in it
    assert b"POC for patient" not in got.raw
    receipt = OutboundMessage.get(OutboundMessage.kind == "receipt")
    assert receipt.state == "queued" and receipt.attempts == 0
    assert "[outbound.smtp] tls" in receipt.last_error
