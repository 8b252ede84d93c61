"""Secrets handed to people (link tokens, reply keys): random, and stored only as hashes."""

from __future__ import annotations

import hashlib
import secrets


def new_link_token() -> str:
    """256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def new_reply_key() -> str:
    """160 random bits; lower-case letters and digits survive any mail system's local part."""
    return secrets.token_hex(20)


def hash_token(token: str) -> str:
    # The inputs have 160+ bits of entropy, so a plain SHA-256 is enough (no need to stretch).
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()
