"""Authentication-Results headers (RFC 8601) that a trusted mail server added, and nothing else.

A sender can write any header, including one that claims our MTA's authserv-id. Following
RFC 8601 section 5, only the topmost contiguous run of Authentication-Results fields from a
trusted authserv-id was written by that server (it prepends its own above everything it
received); a trusted id anywhere else is a forgery attempt, ignored and counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import authres

FIELD = "authentication-results"


@dataclass(frozen=True)
class Verdict:
    """What the trusted block says about the From domain.

    `proven` is True (an aligned pass), False (the server judged and it is not a pass: final)
    or None (no trusted block, or one without a DKIM/DMARC result: the caller decides alone).
    """

    proven: bool | None
    reason: str
    forged: int = 0  # fields claiming a trusted authserv-id outside the trusted block


def clean_domain(value: str) -> str:
    return value.strip().strip(".").lower()


def printable(value: str, limit: int = 80) -> str:
    # Reasons end up in logs and audit rows; these values come from the sender.
    return re.sub(r"[^\x21-\x7e]", "?", value)[:limit]


def aligned(from_domain: str, signing_domain: str) -> bool:
    """Relaxed alignment, approximated without a public-suffix list.

    The signer must control `signing_domain`'s DNS, so accepting a parent domain is safe as
    long as it is not a bare top-level label.
    """
    d = clean_domain(signing_domain)
    f = clean_domain(from_domain)
    if not d or "." not in d:
        return False
    return f == d or f.endswith("." + d)


def judge(msg, from_domain: str, trusted_ids: Iterable[str], *, trust: bool) -> Verdict:
    """The verdict of the trusted server's own Authentication-Results on `from_domain`.

    `trust` is False when the message did not come from where the trusted server can be (a
    client outside `[senders] trusted_relays`): every field then counts for nothing, and
    those claiming a trusted id are counted as forged.
    """
    trusted = {clean_domain(t) for t in trusted_ids if t.strip()}
    if not trusted:
        return Verdict(None, "no trusted authserv-id configured")
    block, forged = _topmost_block(_fields(msg), trusted)
    if not trust:
        return Verdict(None, "authentication-results not trusted from this client",
                       forged + len(block))
    if not block:
        return Verdict(None, "no trusted authentication-results", forged)
    if any(header is None for header in block):
        return Verdict(False, "trusted authentication-results unreadable", forged)
    proven, reason = _judge_block([r for header in block for r in header.results], from_domain)
    return Verdict(proven, reason, forged)


def _fields(msg) -> list[tuple[str, str]]:
    """Header fields top to bottom, as received (unfolded)."""
    try:
        items = list(msg.raw_items())
    except Exception:  # noqa: BLE001 - hostile headers can trip the stdlib's parser
        return []
    return [(str(name), re.sub(r"\r?\n", "", str(value))) for name, value in items]


def _parse(value: str):
    try:
        return authres.parse_value(value)
    except Exception:  # noqa: BLE001 - authres raises several error types on garbage
        return None


def _topmost_block(fields: list[tuple[str, str]], trusted: set[str]) -> tuple[list, int]:
    """The parsed fields of the first contiguous run of trusted Authentication-Results, and
    how many other fields claim a trusted id."""
    block: list = []
    block_id: str | None = None
    closed = False
    forged = 0
    for name, value in fields:
        if name.lower() != FIELD:
            closed = closed or block_id is not None
            continue
        header = _parse(value)
        # The id is read without authres too: a trusted server's field that authres cannot
        # parse must still hold its place (and then proves nothing), not let the next count.
        found = _AUTHSERV_ID.match(value)
        ident = clean_domain(found.group(1)) if found else None
        if ident is None or ident not in trusted:
            closed = closed or block_id is not None
            continue
        if block_id is None:
            block_id = ident
        if not closed and ident == block_id:
            block.append(header)
        else:
            forged += 1
    return block, forged


_AUTHSERV_ID = re.compile(r"\s*([^\s;()]+)")


def _property(result, ptype: str, name: str) -> str | None:
    for prop in getattr(result, "properties", ()):
        if prop.type == ptype and prop.name == name and prop.value:
            return str(prop.value)
    return None


def _signing_domain(result) -> str | None:
    d = _property(result, "header", "d")
    if d is None:
        identity = _property(result, "header", "i")
        d = identity.rsplit("@", 1)[-1] if identity else None
    return d


def _judge_block(results: list, from_domain: str) -> tuple[bool | None, str]:
    """DMARC decides when the server evaluated it; otherwise an aligned DKIM pass. A verdict
    that is not a pass is final: nothing further down the message may overrule it."""
    dmarc = [r for r in results if getattr(r, "method", "") == "dmarc"]
    if dmarc:
        for result in dmarc:
            header_from = _property(result, "header", "from")
            if result.result != "pass":
                return False, f"trusted dmarc={printable(str(result.result))}"
            if header_from is None or clean_domain(header_from) != clean_domain(from_domain):
                return False, "trusted dmarc pass is not for the from domain"
        return True, f"dmarc pass for {from_domain}"
    dkim = [r for r in results if getattr(r, "method", "") == "dkim"]
    if not dkim:
        return None, "trusted authentication-results without dkim or dmarc"
    for result in dkim:
        d = _signing_domain(result)
        if result.result == "pass" and d and aligned(from_domain, d):
            return True, f"dkim pass reported for d={printable(clean_domain(d))}"
    return False, "trusted authentication-results show no aligned pass"
