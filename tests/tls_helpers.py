"""TLS for tests: certificates made with openssl at test time (scripts/test installs it),
client contexts that trust them, and the SMTP intake listening with a certificate."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import socket
import ssl
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mailbridge.receive.smtp import make_controller, make_implicit_tls_controller
from mailbridge.receive.tls import ServerCertificate
from mailbridge.runtime import Runtime
from tests.helpers import required_program
from tests.smtp_sink import free_port


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path

    @property
    def fingerprint(self) -> str:
        return fingerprint(ssl.PEM_cert_to_DER_cert(self.cert.read_text()))

    def client_context(self) -> ssl.SSLContext:
        """A client that trusts this (self-signed) certificate only, and checks the name."""
        return ssl.create_default_context(cafile=str(self.cert))

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def require_openssl() -> None:
    required_program("openssl", "MAILBRIDGE_TEST_REQUIRE_OPENSSL", "apt-get install openssl")


def make_certificate(directory: Path, name: str, *,
                     names: str = "DNS:localhost,IP:127.0.0.1") -> Certificate:
    """A self-signed certificate (EC P-256) valid for `names` (a subjectAltName value)."""
    require_openssl()
    directory.mkdir(parents=True, exist_ok=True)
    made = Certificate(directory / f"{name}.pem", directory / f"{name}.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-addext", f"subjectAltName={names}",
                    "-keyout", str(made.key), "-out", str(made.cert)],
                   check=True, capture_output=True)
    return made


def served_fingerprint(host: str, port: int, *, starttls: bool = True) -> str:
    """The certificate a server presents, after STARTTLS or with implicit TLS."""
    import smtplib

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if starttls:
        with smtplib.SMTP(host, port, timeout=10) as smtp:
            smtp.starttls(context=context)
            return fingerprint(smtp.sock.getpeercert(binary_form=True))
    with smtplib.SMTP_SSL(host, port, timeout=10, context=context) as smtp:
        return fingerprint(smtp.sock.getpeercert(binary_form=True))


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (a relay "elsewhere" that tests
    can still listen on), or None. Connecting a UDP socket sends nothing."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.123", 9))
            address = probe.getsockname()[0]
        with socket.socket() as listener:
            listener.bind((address, 0))
    except OSError:
        return None
    return None if ipaddress.ip_address(address).is_loopback else address


@dataclass(frozen=True)
class Intake:
    runtime: Runtime
    port: int
    implicit_port: int
    certificate: ServerCertificate


@contextlib.contextmanager
def tls_intake(runtime: Runtime, cert: Certificate, *, require_tls: bool = False,
               implicit: bool = False) -> Iterator[Intake]:
    """The SMTP listeners alone (no worker), with `cert`, so tests can look at the spool."""
    smtp = dataclasses.replace(runtime.settings.smtp, port=free_port(),
                               tls_cert_file=str(cert.cert), tls_key_file=str(cert.key),
                               require_tls=require_tls,
                               implicit_tls_port=free_port() if implicit else 0)
    rt = dataclasses.replace(runtime, settings=dataclasses.replace(runtime.settings, smtp=smtp))
    executor = ThreadPoolExecutor(max_workers=2)
    certificate = ServerCertificate(smtp)
    controllers = [make_controller(rt, executor, certificate)]
    if implicit:
        controllers.append(make_implicit_tls_controller(rt, executor, certificate))
    for controller in controllers:
        controller.start()
    try:
        yield Intake(rt, smtp.port, smtp.implicit_tls_port, certificate)
    finally:
        for controller in controllers:
            controller.stop()
        executor.shutdown()
