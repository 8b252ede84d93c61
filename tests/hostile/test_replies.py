"""Attacks on managing a share by e-mail: a signed command or share replayed, commands hidden in
HTML, auto-replies posing as the member, forged delivery reports. Over real SMTP; each attack
revokes, resends and sends nothing (beyond what the genuine message itself did)."""

from __future__ import annotations

import re
import smtplib

import dkim
import pytest

from mailbridge.store.models import AuditEvent, InboundMessage, Share
from tests.conftest import MAIL
from tests.dkim_helpers import sign
from tests.e2e.test_commands import plain_reply, share_and_receipt
from tests.helpers import MEMBER, add_jane, share_message, wire
from tests.hostile.conftest import assert_nothing_happened, snapshot


def signed(svc, msg) -> bytes:
    return sign(wire(msg), "clinic.example", "mb2024", svc.keyring.private_key)


def deliver(svc, raw: bytes, rcpt: str, sender: str = MEMBER) -> None:
    with smtplib.SMTP("127.0.0.1", svc.smtp_port, timeout=30) as smtp:
        smtp.sendmail(sender, [rcpt], raw)


def add_trailing_space(raw: bytes) -> bytes:
    """What DKIM's relaxed body canonicalization ignores: the signature still verifies."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n" + body.replace(b"\r\n", b" \r\n", 1)


@pytest.fixture
def scene(svc):
    add_jane()
    share, reply_to, receipt = share_and_receipt(svc)
    return svc, share, reply_to, receipt


# --- replays -----------------------------------------------------------------------------------


def test_replayed_resend_with_a_trailing_space_does_nothing(scene):
    svc, share, reply_to, receipt = scene
    original = signed(svc, plain_reply("resend", to=reply_to, receipt=receipt))
    deliver(svc, original, reply_to)
    before = snapshot(svc)
    replay = add_trailing_space(original)
    assert replay != original
    deliver(svc, replay, reply_to)
    assert_nothing_happened(svc, before)  # the links the first resend sent still work
    assert InboundMessage.select().order_by(InboundMessage.id.desc()).get().outcome == "repeat"
    assert AuditEvent.select().where(AuditEvent.kind == "message_repeated").count() == 1


def test_replayed_command_under_a_new_unsigned_message_id_does_nothing(scene):
    # The member's provider did not sign Message-ID, so the attacker can change it and the
    # signature still verifies; the signature itself cannot change, and it is remembered.
    svc, share, reply_to, receipt = scene
    raw = wire(plain_reply("extend 2", to=reply_to, receipt=receipt))
    raw = dkim.sign(raw, b"mb2024", b"clinic.example", svc.keyring.private_key,
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[b"from", b"to", b"subject", b"in-reply-to"]) + raw
    deliver(svc, raw, reply_to)
    before = snapshot(svc)
    replay = re.sub(rb"Message-ID: <[^>]+>", b"Message-ID: <replay-1@evil.example>", raw)
    assert replay != raw and dkim.verify(replay, dnsfunc=svc.keyring.dnsfunc)
    deliver(svc, replay, reply_to)
    assert_nothing_happened(svc, before)
    assert InboundMessage.select().order_by(InboundMessage.id.desc()).get().outcome == "repeat"


def test_replayed_share_makes_no_second_share_and_no_second_receipt(svc):
    add_jane()
    original = signed(svc, share_message())
    deliver(svc, original, "share@portal.example")
    before = snapshot(svc)
    deliver(svc, add_trailing_space(original), "share@portal.example")
    assert_nothing_happened(svc, before)
    assert Share.select().count() == 1


def test_replayed_share_to_a_plus_address_is_still_one_share(svc):
    add_jane()
    original = signed(svc, share_message())
    deliver(svc, original, "share@portal.example")
    before = snapshot(svc)
    deliver(svc, original, "share+eve=evil.example@portal.example")
    assert_nothing_happened(svc, before)


# --- hidden commands ---------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [
    '<div style="display:none">revoke</div>Thanks',
    '<div hidden>revoke</div>Thanks',
    '<span style="font-size:0">revoke</span>Thanks',
    '<style>.c{visibility:hidden}</style><p class="c">revoke</p><p>Thanks</p>',
    '<div style="display:none"><table></div>revoke',
], ids=["display-none", "hidden-attribute", "zero-font", "style-sheet", "foster-parented"])
def test_hidden_html_revoke_revokes_nothing(scene, hidden):
    svc, share, reply_to, receipt = scene
    msg = plain_reply("", to=reply_to, receipt=receipt)
    msg.set_content(f"<html><body>{hidden}</body></html>", subtype="html")
    before = snapshot(svc)
    deliver(svc, signed(svc, msg), reply_to)
    after = snapshot(svc)
    assert after.grants == before.grants and after.shares == before.shares
    assert not AuditEvent.select().where(AuditEvent.kind.in_(
        ("grant_revoked", "share_revoked"))).exists()
    # The member hears only the command list: nothing went to the recipient.
    new = svc.sink.messages[before.relayed:]
    assert [m.rcpt_tos for m in new] == [[MEMBER]]


# --- automated mail posing as the member -------------------------------------------------------


@pytest.mark.parametrize("headers", [
    "Precedence: auto_reply",
    "X-Precedence: auto_reply",
    "X-Auto-Response-Suppress: All\nSubject: Out of Office",
], ids=["precedence", "x-precedence", "suppress-with-ooo-subject"])
def test_auto_reply_to_a_receipt_is_never_a_command(scene, headers):
    svc, share, reply_to, receipt = scene
    msg = plain_reply("revoke", to=reply_to, receipt=receipt)
    for line in headers.split("\n"):
        name, _, value = line.partition(": ")
        del msg[name]
        msg[name] = value
    before = snapshot(svc)
    deliver(svc, signed(svc, msg), reply_to)
    assert_nothing_happened(svc, before)


# --- forged delivery reports -------------------------------------------------------------------


def test_forged_bounce_with_a_wrong_mac_changes_nothing(scene):
    svc, share, reply_to, receipt = scene
    raw = (MAIL / "bounce_postfix.eml").read_bytes()
    grant = share.grants.get()
    before = snapshot(svc)
    deliver(svc, wire(raw), f"bounce+{grant.id}.0123456789@reply.portal.example", sender="")
    assert_nothing_happened(svc, before)


def test_forged_bounce_text_never_reaches_staff(scene):
    svc, share, reply_to, receipt = scene
    link = next(m for m in svc.sink.messages if m.rcpt_tos == ["dr.smith@ortho.example"])
    verp = link.mail_from  # a recipient who got the link knows its return path
    raw = re.sub(rb"Diagnostic-Code: [^\n]*",
                 b"Diagnostic-Code: smtp; 550 5.1.1 Click http://evil.example/verify now",
                 (MAIL / "bounce_postfix.eml").read_bytes())
    before = snapshot(svc)
    deliver(svc, wire(raw), verp, sender="")
    svc.drain()
    [notice] = svc.sink.messages[before.relayed:]
    text = notice.message.get_body(("plain",)).get_content()
    assert notice.rcpt_tos == [MEMBER] and "evil.example" not in text
    assert "(status 5.1.1)" in text and "still works" in text
