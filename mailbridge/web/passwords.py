"""Portal passwords: argon2id hashes, and the rules a new password must meet."""

from __future__ import annotations

import functools
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 12
MAX_LENGTH = 256  # argon2 takes anything, but a megabyte "password" is a denial of service
COMMON_FILE = Path(__file__).resolve().parent / "data" / "common_passwords.txt"

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password[:MAX_LENGTH])
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    return _hasher.check_needs_rehash(stored_hash)


# A hash to verify against when there is no account, so "no such account" takes as long as
# "wrong password" and timing does not reveal which addresses have accounts.
DUMMY_HASH = _hasher.hash("mailbridge-no-such-account")


@functools.lru_cache(maxsize=1)
def _common() -> frozenset[str]:
    lines = COMMON_FILE.read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip().lower() for line in lines
                     if line.strip() and not line.startswith("#"))


def password_problem(password: str, address: str) -> str | None:
    """None if acceptable, else a sentence for the person choosing it."""
    if len(password) < MIN_LENGTH:
        return f"Use at least {MIN_LENGTH} characters."
    if len(password) > MAX_LENGTH:
        return f"Use at most {MAX_LENGTH} characters."
    lowered = password.lower()
    local, _, domain = address.lower().partition("@")
    if lowered in (address.lower(), local) or (len(local) >= 4 and local in lowered
                                                and len(lowered) - len(local) < 6):
        return "Do not use your e-mail address as the password."
    if len(set(lowered)) <= 3:
        return "Use more different characters."
    if lowered in _common() or _is_sequence(lowered):
        return "This password is too common; choose one that is harder to guess."
    return None


def _is_sequence(text: str) -> bool:
    """"123456789012", "abcdefghijkl", "987654321098": each character one step from the last."""
    steps = {(ord(b) - ord(a)) % 10 if a.isdigit() and b.isdigit() else ord(b) - ord(a)
             for a, b in zip(text, text[1:], strict=False)}
    return len(steps) == 1 and steps <= {1, -1, 9}
