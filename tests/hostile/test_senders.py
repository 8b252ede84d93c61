"""Attacks on who a message is from: forged Authentication-Results, From fields that parsers
read two ways, signatures that prove nothing. Over real SMTP to the running service; each
attack creates, sends and keeps nothing."""

from __future__ import annotations

import smtplib

import dkim
import pytest

from mailbridge.store.models import AuditEvent, InboundMessage
from tests.helpers import MEMBER, add_jane, share_message, wire
from tests.hostile.conftest import assert_nothing_happened, send_raw, snapshot

TRUSTED = "mx.portal.example"  # the test settings' trusted authserv-id
RECEIVED = (b"Received: from mail.clinic.example ([192.0.2.7]) by mx.portal.example; "
            b"Sat, 28 Nov 2026 09:00:01 -0500\r\n")


def ar(value: str) -> bytes:
    return f"Authentication-Results: {value}\r\n".encode()


PASS = f"{TRUSTED}; dkim=pass header.d=clinic.example; dmarc=pass header.from=clinic.example"
FAIL = f"{TRUSTED}; dkim=fail header.d=clinic.example; dmarc=fail header.from=clinic.example"


def share_bytes(**kwargs) -> bytes:
    return wire(share_message(**kwargs))


# --- forged Authentication-Results --------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    ar(FAIL) + RECEIVED + ar(PASS),  # the trusted server's fail on top, a forged pass below
    ar(PASS) + ar(FAIL),  # a forged pass squeezed into the trusted block: the fail is final
    ar(FAIL) + ar(PASS),
    ar(f"{TRUSTED}; dmarc=pass"),  # a pass that does not say for which From domain
    ar(f"{TRUSTED}; dmarc=pass header.from=evil.example"),
    ar(f"{TRUSTED}; dkim=pass header.d=evil.example"),
    ar(f"{TRUSTED.upper()}.; dmarc=none header.from=clinic.example") + ar(PASS),
], ids=["pass-below-trusted-fail", "pass-above-fail-in-block", "pass-below-fail-in-block",
        "dmarc-pass-without-header-from", "dmarc-pass-for-other-domain",
        "dkim-pass-for-other-domain", "dmarc-none-then-forged-pass"])
def test_forged_authentication_results_create_nothing(svc, headers):
    add_jane()
    before = snapshot(svc)
    send_raw(svc, headers + share_bytes(), sender=MEMBER, signed=False)
    assert_nothing_happened(svc, before)
    assert InboundMessage.get().state == "ignored"


def test_forged_authentication_results_are_recorded_as_an_attempt(svc):
    add_jane()
    send_raw(svc, ar(FAIL) + RECEIVED + ar(PASS) + share_bytes(), sender=MEMBER, signed=False)
    svc.drain()
    event = AuditEvent.get(AuditEvent.kind == "authentication_forged")
    assert event.detail == {"fields": 1} and event.actor == MEMBER


def test_trusted_pass_from_an_internet_client_counts_for_nothing(service_with):
    # mailbridge as the MX: its SMTP client is anyone, so no header can be the MTA's verdict.
    running = service_with(MAILBRIDGE_SENDERS_TRUSTED_RELAYS="192.0.2.0/24")
    add_jane()
    before = snapshot(running)
    send_raw(running, ar(PASS) + share_bytes(), sender=MEMBER, signed=False)
    assert_nothing_happened(running, before)
    assert AuditEvent.get(AuditEvent.kind == "authentication_forged").detail == {"fields": 1}


# --- From fields that parsers read two ways -------------------------------------------------------


@pytest.mark.parametrize("from_", [
    "pat@clinic.example <eve@evil.example>",
    '"jane.doe@clinic.example" <eve@evil.example>',
    "=?utf-8?q?jane.doe=40clinic.example?= <eve@evil.example>",
    "Jane <jane.doe@clinic.example> <eve@evil.example>",
    "Jane <jane.doe@clinic.example",
    '"Jane <jane.doe@clinic.example>',
    "staff: jane.doe@clinic.example;",
    "jane.doe@clinic.example, eve@evil.example",
], ids=["unquoted-address-display", "quoted-address-display", "encoded-address-display",
        "two-angle-addresses", "unclosed-bracket", "unbalanced-quote", "group-syntax",
        "two-mailboxes"])
def test_ambiguous_from_is_refused_like_a_non_member(svc, from_):
    add_jane()
    raw = share_bytes().replace(b"From: Jane Doe <jane.doe@clinic.example>",
                                f"From: {from_}".encode())
    before = snapshot(svc)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send_raw(svc, raw, sender="eve@evil.example")
    assert refused.value.smtp_code == 550 and refused.value.smtp_error.startswith(b"5.7.1")
    assert_nothing_happened(svc, before)
    assert InboundMessage.select().count() == 0


def test_second_from_header_is_refused(svc):
    add_jane()
    raw = b"From: eve@evil.example\r\n" + share_bytes()
    before = snapshot(svc)
    with pytest.raises(smtplib.SMTPDataError):
        send_raw(svc, raw, sender="eve@evil.example")
    assert_nothing_happened(svc, before)


# --- signatures that prove nothing ----------------------------------------------------------------


def test_attackers_own_valid_signature_for_their_domain_proves_nothing(svc):
    add_jane()
    evil_key = svc.keyring.add("evil.example", "s1", bits=1024)
    raw = dkim.sign(share_bytes(), b"s1", b"evil.example", evil_key,
                    include_headers=[b"from", b"to", b"subject"]) + share_bytes()
    before = snapshot(svc)
    send_raw(svc, raw, sender=MEMBER, signed=False)
    assert_nothing_happened(svc, before)


def test_message_altered_after_the_members_signature_proves_nothing(svc):
    add_jane()
    from tests.dkim_helpers import sign

    raw = sign(share_bytes(), "clinic.example", "mb2024", svc.keyring.private_key)
    before = snapshot(svc)
    send_raw(svc, raw.replace(b"dr.smith@ortho.example", b"eve@evil.example"), sender=MEMBER,
             signed=False)
    assert_nothing_happened(svc, before)
