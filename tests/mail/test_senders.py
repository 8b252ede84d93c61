"""The From address and its proof: real DKIM signatures and Authentication-Results headers."""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib

import dkim
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from dkim.canonicalization import CanonicalizationPolicy
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from mailbridge.mail.senders import AuthResult, aligned, authenticate, from_address, headers_trusted
from tests.conftest import MAIL, make_settings
from tests.dkim_helpers import DkimKeyring, make_dkim_key, sign

FIXTURES = MAIL

MESSAGE = b"""\
From: Jordan Alvarez <j.alvarez@clinic.example>
To: share@portal.example
Subject: Plan of care for review
Date: Thu, 16 May 2024 11:40:56 -0400
Message-ID: <plan-of-care-1@clinic.example>
MIME-Version: 1.0
Content-Type: text/plain; charset="UTF-8"

To: dr.smith@ortho.example

Dr. Smith, the updated plan of care is attached.
"""


@pytest.fixture
def cfg(tmp_path):
    return make_settings(tmp_path)


def cfg_with(tmp_path, **senders: str):
    env = {f"MAILBRIDGE_SENDERS_{k.upper()}": v for k, v in senders.items()}
    return make_settings(tmp_path, **env)


@pytest.fixture(scope="module")
def ring():
    return DkimKeyring()


@pytest.fixture(scope="module")
def pems(ring):
    """Private keys published in `ring` under selector sel1."""
    return {d: ring.add(d, "sel1") for d in ("clinic.example", "other.example", "example")}


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def check(raw: bytes, cfg, dnsfunc) -> AuthResult:
    return authenticate(raw, parse(raw), cfg, dnsfunc=dnsfunc)


# --- DKIM ----------------------------------------------------------------------------------


def test_aligned_dkim_signature_passes(pems, ring, cfg):
    raw = sign(MESSAGE, "clinic.example", "sel1", pems["clinic.example"])
    result = check(raw, cfg, ring.dnsfunc)
    assert result == AuthResult(True, "dkim", "dkim signature verified for d=clinic.example")


def test_parent_domain_signature_aligns_with_subdomain_from(pems, ring, cfg):
    raw = MESSAGE.replace(b"j.alvarez@clinic.example", b"j.alvarez@mail.clinic.example")
    raw = sign(raw, "clinic.example", "sel1", pems["clinic.example"])
    assert check(raw, cfg, ring.dnsfunc).ok


def test_signature_of_another_domain_fails(pems, ring, cfg):
    raw = sign(MESSAGE, "other.example", "sel1", pems["other.example"])
    assert dkim.verify(raw, dnsfunc=ring.dnsfunc)  # valid, just not for this From
    result = check(raw, cfg, ring.dnsfunc)
    assert not result.ok
    assert "no aligned dkim signature" in result.reason


def test_single_label_signing_domain_never_aligns(pems, ring, cfg):
    raw = sign(MESSAGE, "example", "sel1", pems["example"])
    assert dkim.verify(raw, dnsfunc=ring.dnsfunc)
    assert check(raw, cfg, ring.dnsfunc).reason.startswith("no aligned dkim signature")


def test_body_modified_after_signing_fails(pems, ring, cfg):
    raw = sign(MESSAGE, "clinic.example", "sel1", pems["clinic.example"])
    tampered = raw.replace(b"dr.smith@ortho.example", b"mallory@evil.example")
    result = check(tampered, cfg, ring.dnsfunc)
    assert not result.ok
    assert "did not verify for d=clinic.example" in result.reason


def test_length_tag_signature_fails_even_though_it_verifies(pems, ring, cfg):
    raw = sign(MESSAGE, "clinic.example", "sel1", pems["clinic.example"], length=True)
    appended = raw + b"\r\nTo: mallory@evil.example\r\n"
    assert dkim.verify(appended, dnsfunc=ring.dnsfunc)  # l= lets the addition through
    result = check(appended, cfg, ring.dnsfunc)
    assert not result.ok
    assert "l= tag" in result.reason


def test_unsigned_message_fails(ring, cfg):
    result = check(MESSAGE, cfg, ring.dnsfunc)
    assert not result.ok
    assert "no dkim signature" in result.reason


def test_missing_dns_record_fails(pems, ring, cfg):
    raw = sign(MESSAGE, "clinic.example", "sel1", pems["clinic.example"])
    result = check(raw, cfg, lambda name, timeout=5: None)
    assert not result.ok and not result.temporary
    assert result.reason.startswith("dkim signature did not verify for d=clinic.example")


def test_dns_timeout_fails_but_is_marked_temporary(pems, ring, cfg):
    def timing_out(name, timeout=5):
        raise dkim.DnsTimeoutError("timed out")

    raw = sign(MESSAGE, "clinic.example", "sel1", pems["clinic.example"])
    result = check(raw, cfg, timing_out)
    assert not result.ok
    assert result.temporary


def test_rotated_key_in_dns_fails(cfg):
    pem, _ = make_dkim_key("clinic.example", "sel1")
    _, other_dns = make_dkim_key("clinic.example", "sel1")
    raw = sign(MESSAGE, "clinic.example", "sel1", pem)
    result = check(raw, cfg, other_dns)
    assert not result.ok
    assert result.reason.startswith("dkim signature did not verify for d=clinic.example")


def test_one_good_signature_among_bad_ones_passes(pems, ring, cfg):
    raw = sign(MESSAGE, "clinic.example", "sel1", pems["clinic.example"])
    raw = sign(raw, "other.example", "sel1", pems["other.example"])
    raw = b"DKIM-Signature: v=1; this is not a tag list\r\n" + raw
    assert check(raw, cfg, ring.dnsfunc).ok


@pytest.mark.parametrize(("header", "reason"), [
    (b"DKIM-Signature: garbage", "malformed dkim signature"),
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=clinic.example; s=sel1; h=from; bh=!!; b=%%",
     "dkim signature did not verify for d=clinic.example"),
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=clinic.example; s=sel1; h=from; bh=YQ==; b=YQ==",
     "dkim signature did not verify for d=clinic.example"),
    (b"DKIM-Signature: v=1; a=rsa-sha1; d=clinic.example; s=sel1; h=from; bh=YQ==; b=YQ==",
     "dkim algorithm not accepted"),
])
def test_malformed_signature_fails_without_raising(ring, cfg, header, reason):
    result = check(header + b"\r\n" + MESSAGE, cfg, ring.dnsfunc)
    assert not result.ok and result.reason.startswith(reason)


def test_rsa_sha1_signature_is_refused(pems, ring, cfg):
    raw = MESSAGE.replace(b"\n", b"\r\n")
    header = dkim.sign(raw, b"sel1", b"clinic.example", pems["clinic.example"],
                       signature_algorithm=b"rsa-sha1", include_headers=[b"from", b"to"])
    assert dkim.verify(header + raw, dnsfunc=ring.dnsfunc)
    result = check(header + raw, cfg, ring.dnsfunc)
    assert not result.ok
    assert "algorithm" in result.reason


def sign_without_from(raw: bytes, domain: bytes, selector: bytes, pem: bytes) -> bytes:
    """A valid signature over To and Subject only; dkimpy itself refuses to make one."""
    raw = raw.replace(b"\n", b"\r\n")
    headers, body = dkim.rfc822_parse(raw)
    relaxed = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    bh = base64.b64encode(hashlib.sha256(relaxed.canonicalize_body(body)).digest())
    value = (b" v=1; a=rsa-sha256; c=relaxed/relaxed; d=" + domain + b"; s=" + selector
             + b"; h=to:subject; bh=" + bh + b"; b=")
    signed = [h for h in headers if h[0].lower() in (b"to", b"subject")]
    canon = relaxed.canonicalize_headers(signed + [[b"DKIM-Signature", value]])
    data = b"".join(n + b":" + v for n, v in canon)[:-2]  # the signature's own CRLF is not hashed
    key = serialization.load_pem_private_key(pem, password=None)
    b = base64.b64encode(key.sign(data, padding.PKCS1v15(), hashes.SHA256()))
    return b"DKIM-Signature:" + value + b + b"\r\n" + raw


def test_signature_that_does_not_cover_from_fails(pems, ring, cfg):
    raw = sign_without_from(MESSAGE, b"clinic.example", b"sel1", pems["clinic.example"])
    assert dkim.verify(raw, dnsfunc=ring.dnsfunc)
    result = check(raw, cfg, ring.dnsfunc)
    assert not result.ok
    assert "does not cover from" in result.reason


# --- Authentication-Results ----------------------------------------------------------------


def with_ar(value: str) -> bytes:
    return f"Authentication-Results: {value}\n".encode() + MESSAGE


def test_trusted_dkim_pass_aligned_passes(cfg):
    raw = with_ar("mx.portal.example; dkim=pass header.d=clinic.example header.s=google")
    result = check(raw, cfg, None)
    assert result.ok
    assert result.method == "authentication-results"


def test_trusted_dkim_pass_by_identity_domain_passes(cfg):
    raw = with_ar("mx.portal.example; dkim=pass header.i=@clinic.example")
    assert check(raw, cfg, None).ok


def test_trusted_dmarc_pass_passes(cfg):
    raw = with_ar("MX.Portal.Example; spf=none; dmarc=pass (p=reject) header.from=clinic.example")
    result = check(raw, cfg, None)
    assert result.ok
    assert result.reason == "dmarc pass for clinic.example"


def test_dmarc_pass_without_header_from_fails(cfg, ring):
    raw = with_ar("mx.portal.example; dmarc=pass")
    result = check(raw, cfg, ring.dnsfunc)
    assert not result.ok
    assert result.reason == "trusted dmarc pass is not for the from domain"


def test_dmarc_pass_for_another_from_domain_fails(cfg, ring):
    raw = with_ar("mx.portal.example; dmarc=pass header.from=other.example")
    assert check(raw, cfg, ring.dnsfunc).reason == "trusted dmarc pass is not for the from domain"


def test_untrusted_authserv_id_is_ignored(cfg, ring):
    raw = with_ar("mx.attacker.example; dkim=pass header.d=clinic.example; "
                  "dmarc=pass header.from=clinic.example")
    result = check(raw, cfg, ring.dnsfunc)
    assert not result.ok
    assert "no trusted authentication-results" in result.reason


def test_dkim_pass_for_unaligned_domain_fails(cfg, ring):
    raw = with_ar("mx.portal.example; dkim=pass header.d=other.example")
    result = check(raw, cfg, ring.dnsfunc)
    assert not result.ok
    assert "no aligned pass" in result.reason


def test_dkim_fail_fails(cfg, ring):
    raw = with_ar("mx.portal.example; dkim=fail (bad signature) header.d=clinic.example")
    result = check(raw, cfg, ring.dnsfunc)
    assert not result.ok
    assert result.reason == "trusted authentication-results show no aligned pass"


RECEIVED = "Received: from mail.clinic.example by mx.portal.example; Thu, 16 May 2024 11:41 -0400\n"


def test_forged_pass_below_the_trusted_servers_fail_is_ignored_and_counted(cfg, ring):
    # The MTA prepends its verdict and its Received line; the sender wrote the "pass" below.
    raw = (b"Authentication-Results: mx.portal.example; dkim=fail header.d=clinic.example; "
           b"dmarc=fail header.from=clinic.example\n" + RECEIVED.encode()
           + with_ar("mx.portal.example; dkim=pass header.d=clinic.example; "
                     "dmarc=pass header.from=clinic.example"))
    result = check(raw, cfg, ring.dnsfunc)
    assert not result.ok
    assert result.reason == "trusted dmarc=fail"
    assert result.forged == 1


@pytest.mark.parametrize("order", ["pass-first", "fail-first"])
def test_a_fail_in_the_trusted_block_is_final(cfg, ring, order):
    fail = "mx.portal.example; dmarc=fail header.from=clinic.example"
    forged = "mx.portal.example; dmarc=pass header.from=clinic.example"
    first, second = (forged, fail) if order == "pass-first" else (fail, forged)
    raw = f"Authentication-Results: {first}\n".encode() + with_ar(second)
    result = check(raw, cfg, ring.dnsfunc)
    assert not result.ok and result.reason == "trusted dmarc=fail"


def test_trusted_fail_is_final_even_when_our_own_dkim_check_would_pass(pems, ring, cfg):
    signed = sign(MESSAGE, "clinic.example", "sel1", pems["clinic.example"])
    raw = b"Authentication-Results: mx.portal.example; dkim=none\r\n" + signed
    result = check(raw, cfg, ring.dnsfunc)
    assert not result.ok and result.reason == "trusted authentication-results show no aligned pass"


def test_trusted_block_without_dkim_or_dmarc_leaves_it_to_our_dkim_check(pems, ring, cfg):
    signed = sign(MESSAGE, "clinic.example", "sel1", pems["clinic.example"])
    raw = b"Authentication-Results: mx.portal.example; spf=pass smtp.mailfrom=clinic.example\r\n"
    result = check(raw + signed, cfg, ring.dnsfunc)
    assert result.ok and result.method == "dkim"


def test_trusted_pass_from_an_untrusted_client_counts_for_nothing(cfg, ring, pems):
    raw = with_ar("mx.portal.example; dkim=pass header.d=clinic.example; "
                  "dmarc=pass header.from=clinic.example")
    result = authenticate(raw, parse(raw), cfg, dnsfunc=ring.dnsfunc, trust_headers=False)
    assert not result.ok and result.forged == 1
    assert "not trusted from this client" in result.reason
    # ... while the member's real signature still works for mail straight from the internet.
    signed = sign(raw, "clinic.example", "sel1", pems["clinic.example"])
    result = authenticate(signed, parse(signed), cfg, dnsfunc=ring.dnsfunc, trust_headers=False)
    assert result.ok and result.method == "dkim" and result.forged == 1


@pytest.mark.parametrize(("channel", "ip", "relays", "trusted"), [
    ("smtp", "127.0.0.1", None, True),
    ("smtp", "::1", None, True),
    ("smtp", "::ffff:127.0.0.1", None, True),
    ("smtp", "203.0.113.9", None, False),
    ("smtp", "", None, False),
    ("smtp", "192.0.2.10", "192.0.2.0/24", True),
    ("smtp", "127.0.0.1", "192.0.2.0/24", False),
    ("imap", "", "192.0.2.0/24", True),
])
def test_headers_trusted_only_from_relays_or_imap(tmp_path, channel, ip, relays, trusted):
    cfg = cfg_with(tmp_path, trusted_relays=relays) if relays else make_settings(tmp_path)
    assert headers_trusted(channel, ip, cfg) is trusted


def test_unparseable_trusted_header_is_ignored(cfg, ring):
    raw = with_ar("mx.portal.example dkim pass header.d clinic.example ;;; ===")
    result = check(raw, cfg, ring.dnsfunc)
    assert not result.ok and result.reason == "trusted authentication-results unreadable"


def test_no_trusted_ids_configured_means_headers_count_for_nothing(tmp_path, ring):
    cfg = cfg_with(tmp_path, trusted_authserv_ids="")
    raw = with_ar("mx.portal.example; dmarc=pass header.from=clinic.example")
    result = check(raw, cfg, ring.dnsfunc)
    assert not result.ok and result.reason.endswith("no trusted authserv-id configured")


def test_google_workspace_fixture_passes_by_trusted_header_alone(cfg, ring):
    raw = (FIXTURES / "gmail_ar_dkim_pass.eml").read_bytes()
    result = check(raw, cfg, ring.dnsfunc)
    assert result.ok and result.method == "authentication-results"
    # Its DKIM-Signature is not real: without the trusted header nothing proves the sender.
    alone = check(raw, cfg_with(cfg.service.data_dir, trusted_authserv_ids=""), ring.dnsfunc)
    assert not alone.ok
    assert alone.reason.startswith("dkim signature did not verify for d=clinic.example")


# --- configuration and the From address ----------------------------------------------------


def test_authentication_can_be_switched_off(tmp_path):
    cfg = cfg_with(tmp_path, require_authentication="false")
    assert check(MESSAGE, cfg, None) == AuthResult(
        True, "not-required", "authentication not required by configuration")


def test_message_without_usable_from_is_not_authenticated(cfg, ring):
    raw = MESSAGE.replace(b"From: Jordan Alvarez <j.alvarez@clinic.example>\n", b"")
    result = check(raw, cfg, ring.dnsfunc)
    assert not result.ok
    assert "from address" in result.reason


def test_from_address_lower_cases_and_drops_display_name():
    msg = parse(b"From: \"Nguyen, Mai\" <Mai.Nguyen@Clinic.Example>\n\nhi\n")
    assert from_address(msg) == "mai.nguyen@clinic.example"


@pytest.mark.parametrize("header", [
    b"From: \"J. Alvarez\" <j.alvarez@clinic.example>",
    b"From: J. Alvarez <j.alvarez@clinic.example>",
    b"From: <j.alvarez@clinic.example>",
    b"From: j.alvarez@clinic.example",
    b"From: j.alvarez@clinic.example (Jordan Alvarez)",
    b"From: =?utf-8?q?Jordan_=C3=81lvarez?= <j.alvarez@clinic.example>",
    b"From: \"j.alvarez@clinic.example\" <j.alvarez@clinic.example>",
])
def test_from_address_reads_the_usual_forms(header):
    assert from_address(parse(header + b"\n\nbody\n")) == "j.alvarez@clinic.example"


@pytest.mark.parametrize("header", [
    # Python reads pat, DMARC checkers read eve: refused rather than guessed.
    b"From: pat@clinic.example <eve@evil.example>",
    b"From: \"pat@clinic.example\" <eve@evil.example>",
    b"From: =?utf-8?q?pat=40clinic=2Eexample?= <eve@evil.example>",
    b"From: Pat <pat@clinic.example",
    b"From: \"Pat <pat@clinic.example>",
    b"From: Pat <pat@clinic.example> <eve@evil.example>",
    b"From: Pat <<pat@clinic.example>>",
    b"From: team: pat@clinic.example;",
    b"From: pat@clinic.example,",
    b"From: (pat@clinic.example) eve@evil.example",
])
def test_from_that_parsers_could_read_differently_is_refused(header):
    assert from_address(parse(header + b"\n\nbody\n")) is None


@pytest.mark.parametrize("header", [
    b"From: a@clinic.example, b@clinic.example",
    b"From: a@clinic.example\nFrom: b@clinic.example",
    b"From: not an address",
    b"From: undisclosed-recipients:;",
    b"From: a@@clinic.example",
    b"Sender: a@clinic.example",
])
def test_from_address_none_unless_exactly_one_valid(header):
    assert from_address(parse(header + b"\n\nbody\n")) is None


def test_alignment_rules():
    assert aligned("clinic.example", "clinic.example")
    assert aligned("mail.clinic.example", "Clinic.Example.")
    assert not aligned("clinic.example", "mail.clinic.example")
    assert not aligned("clinic.example", "example")
    assert not aligned("evilclinic.example", "clinic.example")


@hsettings(max_examples=150, deadline=None)
@given(st.binary(max_size=600))
def test_never_raises_on_arbitrary_bytes(tmp_path_factory, data):
    cfg = make_settings(tmp_path_factory.getbasetemp())
    raw = (b"Authentication-Results: mx.portal.example; dkim=pass\n"
           b"DKIM-Signature: v=1; a=rsa-sha256; d=clinic.example; s=s; h=from; bh=YQ==; b=YQ==\n"
           b"From: x@clinic.example\n" + data)
    msg = parse(raw)
    from_address(msg)
    result = authenticate(raw, msg, cfg, dnsfunc=lambda name, timeout=5: None)
    assert isinstance(result, AuthResult)
