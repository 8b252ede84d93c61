"""E-mail addresses as written by people and mail clients, made comparable: one address in
its normalised, lower-case form (grants, members and accounts store that form)."""

from __future__ import annotations

import email.utils

from email_validator import EmailNotValidError, validate_email


def normalise(text: str) -> str | None:
    """'Dr Smith <Dr.Smith@Ortho.example>' or 'dr.smith@ortho.example' → the address, lower
    case; None if it is not one valid address."""
    try:
        _, parsed = email.utils.parseaddr(text)
        return validate_email((parsed or text).strip(),
                              check_deliverability=False).normalized.lower()
    except (EmailNotValidError, ValueError, UnicodeError):
        return None
