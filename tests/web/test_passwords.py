"""Password rules and hashing."""

from __future__ import annotations

import pytest

from mailbridge.web.passwords import hash_password, needs_rehash, password_problem, verify_password

ADDRESS = "dr.smith@ortho.example"


@pytest.mark.parametrize("password, problem", [
    ("short pass", "at least 12"),
    ("dr.smith@ortho.example", "e-mail address"),
    ("DR.SMITH@ORTHO.EXAMPLE", "e-mail address"),
    ("dr.smith2024!", "e-mail address"),
    ("password1234", "too common"),
    ("Welcome12345", "too common"),
    ("123456789012", "too common"),
    ("abcdefghijklm", "too common"),
    ("aaaaaaaaaaaaaaaa", "different characters"),
    ("x" * 300, "at most"),
])
def test_weak_passwords_are_refused_with_a_reason(password, problem):
    assert problem in (password_problem(password, ADDRESS) or "")


@pytest.mark.parametrize("password", ["correct horse battery", "Ortho-clinic visits 2026",
                                      "v9#Lm2$pQ7!z"])
def test_reasonable_passwords_pass(password):
    assert password_problem(password, ADDRESS) is None


def test_argon2id_hash_verifies_only_the_right_password():
    stored = hash_password("correct horse battery")
    assert stored.startswith("$argon2id$")
    assert verify_password(stored, "correct horse battery")
    assert not verify_password(stored, "correct horse batterY")
    assert not verify_password("not a hash", "anything")
    assert not needs_rehash(stored)
