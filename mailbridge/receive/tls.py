"""The SMTP intake's TLS certificate: loaded at start, swapped for a renewed one on reload.

The listeners keep the context they were started with; its SNI callback (which OpenSSL calls
for every handshake, with or without a server name) moves each new connection to the newest
context. A reload builds and checks a whole new context before swapping, so a bad renewal
leaves the running certificate in place and an open connection keeps the one it started with.
"""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path

from mailbridge.config import ConfigError
from mailbridge.settings import SmtpSettings

log = logging.getLogger(__name__)


class ServerCertificate:
    def __init__(self, smtp: SmtpSettings) -> None:
        self.cert_file = smtp.tls_cert_file
        self.key_file = smtp.tls_key_file
        self._lock = threading.Lock()
        self._current = self._load()
        self.context = self._current  # handed to the listeners once

    def reload(self) -> bool:
        """Read the files again; on any problem log it (naming the key) and keep the old."""
        try:
            fresh = self._load()
        except ConfigError as exc:
            log.error("smtp: kept the current TLS certificate: %s", exc)
            return False
        with self._lock:
            self._current = fresh
        log.info("smtp: TLS certificate reloaded from [smtp] tls_cert_file")
        return True

    def _select(self, ssl_object, server_name, context) -> None:
        with self._lock:
            current = self._current
        if context is not current:
            ssl_object.context = current

    def _load(self) -> ssl.SSLContext:
        _read(self.cert_file, "tls_cert_file", b"-----BEGIN CERTIFICATE-----",
                     "a PEM certificate")
        _read(self.key_file, "tls_key_file", b"PRIVATE KEY-----", "a PEM private key")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
                raise ConfigError(f"[smtp] tls_key_file: {self.key_file} is not the key of the "
                                  f"certificate in [smtp] tls_cert_file") from None
            raise ConfigError(f"[smtp] tls_cert_file / tls_key_file: cannot use {self.cert_file}"
                              f" with {self.key_file} ({exc})") from None
        except OSError as exc:  # replaced between our read and OpenSSL's
            raise ConfigError(f"[smtp] tls_cert_file / tls_key_file: cannot read "
                              f"({exc})") from None
        context.sni_callback = self._select
        return context


def _read(path: str, key: str, marker: bytes, what: str) -> None:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"[smtp] {key}: cannot read {path} ({exc.strerror or exc})") from None
    if marker not in data:
        raise ConfigError(f"[smtp] {key}: {path} does not hold {what}")
