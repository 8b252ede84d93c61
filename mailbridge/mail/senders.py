"""Who sent a message, and whether the From domain is proven by DKIM or a trusted MTA's verdict.

From: alone is forgeable, so a member is only recognised when this module says the From
address is authenticated (see the sender-identity row of the design brief).
"""

from __future__ import annotations

import email.header
import email.utils
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

import dkim
from dkim.dnsplug import get_txt
from dkim.util import InvalidTagValueList, parse_tag_value
from email_validator import EmailNotValidError, ValidatedEmail, validate_email

from mailbridge.mail import authresults
from mailbridge.mail.authresults import aligned, clean_domain, printable

DnsFunc = Callable[..., bytes | None]

__all__ = ["AuthResult", "aligned", "authenticate", "from_address", "headers_trusted",
           "verify_dkim"]


@dataclass(frozen=True)
class AuthResult:
    """`reason` is short and carries domains at most, never addresses or content.

    `temporary` is true when the only obstacle was a DNS timeout: retrying later may pass.
    `forged` counts Authentication-Results fields that claimed a trusted authserv-id but
    cannot have come from that server (recorded as a forgery attempt).
    """

    ok: bool
    method: str  # "dkim", "authentication-results", "not-required", or "" when not ok
    reason: str
    temporary: bool = False
    forged: int = 0


# --- the From address ----------------------------------------------------------------------
#
# Parsers disagree about malformed From fields: Python reads `pat@clinic.example
# <eve@evil.example>` as pat, DMARC checkers as eve. Only the forms every parser reads the
# same way are accepted: `addr`, `addr (comment)`, `<addr>`, `Display Name <addr>` and
# `"Quoted Name" <addr>` — and the display name must not itself look like another address.

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_ADDR = rf"{_DOT_ATOM}@{_DOT_ATOM}"
_QUOTED = r'"(?:[^"\\\r\n]|\\[^\r\n])*"'
_PHRASE = rf"(?:{_ATEXT}|\.)+(?:[ \t]+(?:{_ATEXT}|\.)+)*"
_COMMENT = r"\([^()<>@\\\"]*\)"
_NAME_ADDR = re.compile(rf"[ \t]*(?P<name>{_QUOTED}|{_PHRASE})?[ \t]*<(?P<addr>{_ADDR})>[ \t]*")
_BARE_ADDR = re.compile(rf"[ \t]*(?P<addr>{_ADDR})[ \t]*(?:{_COMMENT}[ \t]*)?")
_LOOKS_LIKE_ADDRESS = re.compile(r"[^\s@<>\"]+@[^\s@<>\"]+\.[^\s@<>\"]+")


def _raw_from(msg) -> str | None:
    """The one From field as received, unfolded; None if there is not exactly one."""
    try:
        values = [value for name, value in msg.raw_items() if name.lower() == "from"]
    except Exception:  # noqa: BLE001 - the stdlib's parser can trip over hostile headers
        return None
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    return re.sub(r"\r?\n(?=[ \t])", "", values[0]).strip("\r\n")


def _display_text(name: str) -> str:
    if name.startswith('"'):
        name = re.sub(r"\\(.)", r"\1", name[1:-1])
    try:
        return str(email.header.make_header(email.header.decode_header(name)))
    except Exception:  # noqa: BLE001 - unknown charsets, broken words: keep the text
        return name


def _unambiguous_addr(raw: str) -> str | None:
    """The address of a From field that every parser reads the same way, else None."""
    match = _NAME_ADDR.fullmatch(raw) or _BARE_ADDR.fullmatch(raw)
    if match is None:
        return None
    addr = match.group("addr")
    name = match.groupdict().get("name") or ""
    for shown in _LOOKS_LIKE_ADDRESS.findall(_display_text(name)):
        if shown.strip(".,;:'()[]").lower() != addr.lower():
            return None  # a display name that is itself another address
    return addr


def _stdlib_addr(msg) -> str | None:
    try:
        values = msg.get_all("From") or []
        if len(values) != 1:
            return None
        addresses = getattr(values[0], "addresses", None)
        if addresses is None:  # a compat32 message gives plain strings
            found = [a for _, a in email.utils.getaddresses([str(values[0])]) if a]
        else:
            found = [a.addr_spec for a in addresses]
    except Exception:  # noqa: BLE001
        return None
    return found[0] if len(found) == 1 else None


def _validated_from(msg) -> ValidatedEmail | None:
    raw = _raw_from(msg)
    addr = _unambiguous_addr(raw) if raw is not None else None
    if addr is None:
        return None
    # The parser the rest of the code (and the MTA in front) uses must read the same address.
    parsed = _stdlib_addr(msg)
    if parsed is None or parsed.lower() != addr.lower():
        return None
    try:
        return validate_email(addr, check_deliverability=False)
    except EmailNotValidError:
        return None


def from_address(msg) -> str | None:
    """The single From address, lower-cased; None if it is missing, repeated, invalid, or
    written so that different parsers could read different addresses."""
    validated = _validated_from(msg)
    return validated.normalized.lower() if validated else None


# --- where trusted headers can come from ---------------------------------------------------


def headers_trusted(channel: str, client_ip: str, settings) -> bool:
    """Can the trusted MTA have written this message's Authentication-Results? Over IMAP the
    configured provider delivered it; over SMTP or LMTP on TCP only a client in `[senders]
    trusted_relays` (the MTA in front of us) can be that server; over LMTP on a Unix socket,
    the MTA on this host. Mail straight from the internet cannot."""
    if channel == "imap":
        return True
    if channel == "lmtp" and not client_ip:
        return True  # LMTP over a Unix socket: the MTA on this host, by the socket's mode
    try:
        address = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in ipaddress.ip_network(net, strict=False)
               for net in settings.senders.trusted_relays)


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
    d = printable(tags.get(b"d", b"").decode("ascii", "replace"))
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
        d = clean_domain(printable(tags[b"d"].decode("ascii", "replace")))
        try:
            verified = verifier.verify(idx=idx, dnsfunc=lookup)
        except Exception:  # malformed tags, unusable keys, resolver errors: not proven
            verified = False
        if verified:
            return AuthResult(True, "dkim", f"dkim signature verified for d={d}")
        reasons.append(f"dkim signature did not verify for d={d}")
    unique = list(dict.fromkeys(reasons))
    return AuthResult(False, "", "; ".join(unique), temporary=bool(timeouts))


# --- the decision --------------------------------------------------------------------------


def authenticate(raw: bytes, msg, settings, dnsfunc: DnsFunc | None = None, *,
                 trust_headers: bool = True) -> AuthResult:
    """Is the single From address proven? Never raises.

    The trusted MTA's own Authentication-Results come first (no DNS needed); when they
    judged DKIM or DMARC and it is not a pass, that is final. Without such a verdict our own
    DKIM check decides. `trust_headers` is `headers_trusted(...)` for the message's origin.
    `dnsfunc` replaces dkimpy's DNS lookup (tests only; None means real DNS).
    """
    if not settings.senders.require_authentication:
        return AuthResult(True, "not-required", "authentication not required by configuration")
    validated = _validated_from(msg)
    if validated is None:
        return AuthResult(False, "", "no single unambiguous from address")
    domain = validated.ascii_domain.lower()
    verdict = authresults.judge(msg, domain, settings.senders.trusted_authserv_ids,
                                    trust=trust_headers)
    if verdict.proven is True:
        return AuthResult(True, "authentication-results", verdict.reason, forged=verdict.forged)
    if verdict.proven is False:
        return AuthResult(False, "", verdict.reason, forged=verdict.forged)
    by_dkim = verify_dkim(raw, domain, dnsfunc)
    if by_dkim.ok:
        return AuthResult(True, "dkim", by_dkim.reason, forged=verdict.forged)
    return AuthResult(False, "", f"{by_dkim.reason}; {verdict.reason}",
                      temporary=by_dkim.temporary, forged=verdict.forged)
