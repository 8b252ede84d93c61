"""Encrypted storage: small sealed values and streamed, chunk-encrypted document blobs."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_SEAL_VERSION = b"\x01"


def seal(key: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """AES-256-GCM with a random nonce; for small values kept in the database."""
    nonce = os.urandom(12)
    return _SEAL_VERSION + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes = b"") -> bytes:
    """Inverse of `seal`; raises cryptography.exceptions.InvalidTag if tampered with."""
    if sealed[:1] != _SEAL_VERSION:
        raise ValueError("unknown sealed-value version")
    return AESGCM(key).decrypt(sealed[1:13], sealed[13:], aad)
