"""Real DKIM keys and signatures for tests, served by an in-memory stand-in for DNS.

`DkimKeyring.dnsfunc` has dkimpy's lookup signature, so it can be handed to anything that
accepts an injected `dnsfunc` (senders.authenticate, or the running service in e2e tests).
"""

from __future__ import annotations

import base64
import re

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SIGNED_HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "MIME-Version",
                  "Content-Type", "Reply-To", "In-Reply-To", "References")


def _record_name(name: bytes | str) -> str:
    text = name.decode("ascii") if isinstance(name, bytes) else name
    return text.strip().rstrip(".").lower()


class DkimKeyring:
    """Keys for any number of domains/selectors, all answered by one `dnsfunc`."""

    def __init__(self) -> None:
        self._records: dict[str, bytes] = {}

    def add(self, domain: str, selector: str = "mb2024", *, bits: int = 2048) -> bytes:
        """Create a key, publish its TXT record, and return the private key (PEM)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        public_der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.publish(domain, selector,
                     b"v=DKIM1; k=rsa; p=" + base64.b64encode(public_der))
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())

    def publish(self, domain: str, selector: str, txt: bytes) -> None:
        """Serve `txt` as the record (e.g. to simulate a rotated or broken key)."""
        self._records[_record_name(f"{selector}._domainkey.{domain}")] = txt

    def dnsfunc(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        return self._records.get(_record_name(name))


def make_dkim_key(domain: str, selector: str = "mb2024"):
    """(private key PEM, dnsfunc serving its public key) for a single domain."""
    ring = DkimKeyring()
    return ring.add(domain, selector), ring.dnsfunc


def sign(raw: bytes, domain: str, selector: str, privkey_pem: bytes,
         length: bool = False) -> bytes:
    """`raw` with a DKIM-Signature prepended (relaxed/relaxed, like most providers).

    Line endings are made CRLF first, as SMTP transport would, so the signature still
    verifies after the message has travelled through smtplib.
    """
    raw = re.sub(rb"\r?\n", b"\r\n", raw)
    present = {m.group(1).lower() for m in re.finditer(rb"^([!-9;-~]+):", raw.split(
        b"\r\n\r\n", 1)[0], re.M)}
    headers = [h.encode() for h in SIGNED_HEADERS if h.lower().encode() in present]
    signature = dkim.sign(raw, selector.encode(), domain.encode(), privkey_pem,
                          canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=headers, length=length)
    return signature + raw
