"""Who sent a message, and whether the From domain is proven by DKIM or a trusted MTA's verdict.

From: alone is forgeable, so a member is only recognised when this module says the From
address is authenticated (see the sender-identity row of the design brief).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import authres
import dkim
from dkim.dnsplug import get_txt
from dkim.util import InvalidTagValueList, parse_tag_value
from email_validator import EmailNotValidError, ValidatedEmail, validate_email

DnsFunc = Callable[..., bytes | None]


@dataclass(frozen=True)
class AuthResult:
    """`reason` is short and carries domains at most, never addresses or content.

    `temporary` is true when the only obstacle was a DNS timeout: retrying later may pass.
    """

    ok: bool
    method: str  # "dkim", "authentication-results", "not-required", or "" when not ok
    reason: str
    temporary: bool = False


# --- the From address ----------------------------------------------------------------------


def _validated_from(msg) -> ValidatedEmail | None:
    try:
        values = msg.get_all("From") or []
        if len(values) != 1:
            return None
        addresses = getattr(values[0], "addresses", None)
        if addresses is None:  # a compat32 message gives plain strings
            candidates = [a for _, a in email.utils.getaddresses([str(values[0])]) if a]
        else:
            candidates = [a.addr_spec for a in addresses]
    except Exception:  # the stdlib's address parser can trip over hostile headers
        return None
    if len(candidates) != 1:
        return None
    try:
        return validate_email(candidates[0], check_deliverability=False)
    except EmailNotValidError:
        return None


def from_address(msg) -> str | None:
    """The single From address, lower-cased; None if it is missing, repeated or invalid."""
    validated = _validated_from(msg)
    return validated.normalized.lower() if validated else None


# --- alignment -----------------------------------------------------------------------------


def _clean_domain(value: str) -> str:
    return value.strip().strip(".").lower()


def aligned(from_domain: str, signing_domain: str) -> bool:
    """Relaxed alignment, approximated without a public-suffix list.

    The signer must control `signing_domain`'s DNS, so accepting a parent domain is safe as
    long as it is not a bare top-level label.
    """
    d = _clean_domain(signing_domain)
    f = _clean_domain(from_domain)
    if not d or "." not in d:
        return False
    return f == d or f.endswith("." + d)


def _printable(value: str, limit: int = 80) -> str:
    # Reasons end up in logs and audit rows; tag values come from the sender.
    return re.sub(r"[^\x21-\x7e]", "?", value)[:limit]


# --- DKIM ----------------------------------------------------------------------------------


def _watching_timeouts(dnsfunc: DnsFunc, timeouts: list[bytes]) -> DnsFunc:
    # dkimpy turns a DNS timeout into a plain "not verified"; remember it so the caller
    # can retry later instead of dropping a legitimate message.
    def lookup(name, timeout=5):
        try:
            return dnsfunc(name, timeout=timeout)
        except dkim.DnsTimeoutError:
            timeouts.append(name)
            raise

    return lookup


# RFC 8301: verifiers must not accept rsa-sha1 any more.
_ACCEPTED_ALGORITHMS = (b"rsa-sha256", b"ed25519-sha256")


def _signature_problem(tags: dict, from_domain: str) -> str | None:
    d = _printable(tags.get(b"d", b"").decode("ascii", "replace"))
    if b"l" in tags:
        # With l= anyone can append content after the signed part of the body.
        return "dkim l= tag present"
    if not aligned(from_domain, d):
        return "no aligned dkim signature"
    if tags.get(b"a", b"").strip().lower() not in _ACCEPTED_ALGORITHMS:
        return "dkim algorithm not accepted"
    signed = [h.strip().lower() for h in tags.get(b"h", b"").split(b":")]
    if b"from" not in signed:
        return "dkim signature does not cover from"
    return None


def verify_dkim(raw: bytes, from_domain: str, dnsfunc: DnsFunc | None = None) -> AuthResult:
    """Pass if any DKIM-Signature without l= and with d= aligned to `from_domain` verifies."""
    timeouts: list[bytes] = []
    lookup = _watching_timeouts(dnsfunc or get_txt, timeouts)
    try:
        verifier = dkim.DKIM(raw)
        headers = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    except Exception:  # dkimpy's header parser raises on malformed input
        return AuthResult(False, "", "message unreadable for dkim")
    if not headers:
        return AuthResult(False, "", "no dkim signature")
    reasons: list[str] = []
    for idx, value in enumerate(headers):
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList:
            reasons.append("malformed dkim signature")
            continue
        problem = _signature_problem(tags, from_domain)
        if problem:
            reasons.append(problem)
            continue
        d = _clean_domain(_printable(tags[b"d"].decode("ascii", "replace")))
        try:
            verified = verifier.verify(idx=idx, dnsfunc=lookup)
        except Exception:  # malformed tags, unusable keys, resolver errors: not proven
            verified = False
        if verified:
            return AuthResult(True, "dkim", f"dkim signature verified for d={d}")
        reasons.append(f"dkim signature did not verify for d={d}")
    unique = list(dict.fromkeys(reasons))
    return AuthResult(False, "", "; ".join(unique), temporary=bool(timeouts))


# --- Authentication-Results ----------------------------------------------------------------


def _property(result, ptype: str, name: str) -> str | None:
    for prop in getattr(result, "properties", ()):
        if prop.type == ptype and prop.name == name and prop.value:
            return str(prop.value)
    return None


def _judge(result, from_domain: str) -> str | None:
    """A short reason if this result clause proves `from_domain`, else None."""
    method = getattr(result, "method", "")
    if getattr(result, "result", "") != "pass":
        return None
    if method == "dmarc":
        header_from = _property(result, "header", "from")
        if header_from is None or _clean_domain(header_from) == _clean_domain(from_domain):
            return f"dmarc pass for {from_domain}"
        return None
    if method == "dkim":
        d = _property(result, "header", "d")
        if d is None:
            identity = _property(result, "header", "i")
            d = identity.rsplit("@", 1)[-1] if identity else None
        if d and aligned(from_domain, d):
            return f"dkim pass reported for d={_printable(_clean_domain(d))}"
    return None


def check_authentication_results(msg, from_domain: str,
                                 trusted_ids: Iterable[str]) -> AuthResult:
    """Pass if an Authentication-Results header from a trusted authserv-id proves the domain.

    Headers from any other authserv-id are ignored: the sender could have written them.
    """
    trusted = {_clean_domain(t) for t in trusted_ids if t.strip()}
    if not trusted:
        return AuthResult(False, "", "no trusted authserv-id configured")
    try:
        values = [str(v) for v in msg.get_all("Authentication-Results") or []]
    except Exception:  # hostile header values can trip the stdlib's header parser
        values = []
    seen_trusted = False
    for value in values:
        try:
            header = authres.parse_value(re.sub(r"\r?\n", "", value))
        except Exception:  # authres raises several error types on garbage
            continue
        if _clean_domain(header.authserv_id or "") not in trusted:
            continue
        seen_trusted = True
        for result in header.results:
            reason = _judge(result, from_domain)
            if reason:
                return AuthResult(True, "authentication-results", reason)
    if seen_trusted:
        return AuthResult(False, "", "trusted authentication-results show no aligned pass")
    return AuthResult(False, "", "no trusted authentication-results")


# --- the decision --------------------------------------------------------------------------


def authenticate(raw: bytes, msg, settings, dnsfunc: DnsFunc | None = None) -> AuthResult:
    """Is the single From address proven? Never raises.

    The trusted MTA's verdict is checked first because it needs no DNS; our own DKIM check
    follows. `dnsfunc` replaces dkimpy's DNS lookup (tests only; None means real DNS).
    """
    if not settings.senders.require_authentication:
        return AuthResult(True, "not-required", "authentication not required by configuration")
    validated = _validated_from(msg)
    if validated is None:
        return AuthResult(False, "", "no single valid from address")
    domain = validated.ascii_domain.lower()
    by_header = check_authentication_results(msg, domain, settings.senders.trusted_authserv_ids)
    if by_header.ok:
        return by_header
    by_dkim = verify_dkim(raw, domain, dnsfunc)
    if by_dkim.ok:
        return by_dkim
    return AuthResult(False, "", f"{by_dkim.reason}; {by_header.reason}",
                      temporary=by_dkim.temporary)
