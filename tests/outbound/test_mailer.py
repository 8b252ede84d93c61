"""The transports against a real SMTP server and a real Maildir: what is delivered, and which
relay answers count as permanent or transient."""

from __future__ import annotations

import mailbox
from email import policy
from email.parser import BytesParser

import pytest

from mailbridge.config import ConfigError, load_settings
from mailbridge.outbound import compose
from mailbridge.outbound.mailer import (
    HeldBack,
    MaildirMailer,
    PermanentFailure,
    SmtpMailer,
    TransientFailure,
    is_loopback,
    make_mailer,
    phi_in_clear_refused,
)
from mailbridge.settings import RelaySettings
from tests.smtp_sink import SmtpSink, free_port
from tests.tls_helpers import make_certificate, non_loopback_address

LINK = "http://localhost:8080/s/Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG0"


def settings_for(tmp_path, **env):
    return load_settings(None, env={
        "MAILBRIDGE_SERVICE_BASE_URL": "http://localhost:8080",
        "MAILBRIDGE_ADDRESSES_SHARING": "share@portal.example",
        "MAILBRIDGE_ADDRESSES_REPLY_DOMAIN": "reply.portal.example",
        "MAILBRIDGE_OUTBOUND_FROM": "mailbridge@portal.example",
        "MAILBRIDGE_SERVICE_DATA_DIR": str(tmp_path),
        **env,
    })


@pytest.fixture
def settings(tmp_path):
    return settings_for(tmp_path)


@pytest.fixture
def sink():
    with SmtpSink(refuse=["nobody@ortho.example"]) as s:
        yield s


def link_bytes(settings, to="dr.smith@ortho.example") -> bytes:
    msg = compose.link_email(settings, to=to, link_url=LINK, clinic_name="Riverside PT",
                             sender_name="Jane Doe", document_count=1, deadline_text="tomorrow")
    return msg.as_bytes(policy=policy.SMTP)


def compose_id(raw: bytes) -> str:
    return BytesParser(policy=policy.default).parsebytes(raw)["Message-ID"]


def relay(port: int, **kw) -> RelaySettings:
    """The plain test sink on loopback, unless `kw` asks for TLS."""
    kw.setdefault("tls", "" if "starttls" in kw else "none")
    return RelaySettings(host="127.0.0.1", port=port, timeout_seconds=5, **kw)


def test_smtp_delivers_with_the_given_envelope(settings, sink):
    raw = link_bytes(settings)
    SmtpMailer(relay(sink.port), helo_name="portal.example").send(
        "bounces@portal.example", "dr.smith@ortho.example", raw)
    got, = sink.wait_for(1)
    assert got.mail_from == "bounces@portal.example"
    assert got.rcpt_tos == ["dr.smith@ortho.example"]
    assert got.message["Message-ID"] == compose_id(raw)
    assert LINK in got.message.get_body(("plain",)).get_content()


def test_smtp_refused_recipient_is_permanent(settings, sink):
    with pytest.raises(PermanentFailure) as info:
        SmtpMailer(relay(sink.port)).send("mailbridge@portal.example",
                                          "nobody@ortho.example", link_bytes(settings))
    assert "550 5.1.1" in info.value.reason
    assert sink.messages == []


def test_smtp_451_is_transient(settings):
    with SmtpSink(tempfail_first=1) as sink:
        mailer = SmtpMailer(relay(sink.port))
        with pytest.raises(TransientFailure) as info:
            mailer.send("mailbridge@portal.example", "dr.smith@ortho.example",
                        link_bytes(settings))
        assert "451" in info.value.reason
        mailer.send("mailbridge@portal.example", "dr.smith@ortho.example", link_bytes(settings))
        assert len(sink.wait_for(1)) == 1


def test_smtp_sends_share_one_connection_and_reconnect_after_the_relay_restarts(settings):
    sink = SmtpSink().start()
    mailer = SmtpMailer(relay(sink.port), helo_name="portal.example")
    for i in range(3):
        mailer.send("mailbridge@portal.example", f"dr.{i}@ortho.example", link_bytes(settings))
    assert len(sink.wait_for(3)) == 3 and sink.connections == 1
    sink.stop()  # the kept connection dies with the relay
    with SmtpSink(port=sink.port) as restarted:
        mailer.send("mailbridge@portal.example", "dr.3@ortho.example", link_bytes(settings))
        got, = restarted.wait_for(1)
        assert got.rcpt_tos == ["dr.3@ortho.example"]
        mailer.close()
        mailer.send("mailbridge@portal.example", "dr.4@ortho.example", link_bytes(settings))
        assert len(restarted.wait_for(2)) == 2 and restarted.connections == 2


def test_smtp_connection_survives_a_refused_recipient(settings, sink):
    mailer = SmtpMailer(relay(sink.port))
    with pytest.raises(PermanentFailure):
        mailer.send("mailbridge@portal.example", "nobody@ortho.example", link_bytes(settings))
    mailer.send("mailbridge@portal.example", "dr.smith@ortho.example", link_bytes(settings))
    got, = sink.wait_for(1)
    assert got.rcpt_tos == ["dr.smith@ortho.example"]


def test_smtp_relay_down_is_transient(settings):
    with pytest.raises(TransientFailure, match="relay unreachable"):
        SmtpMailer(relay(free_port())).send("mailbridge@portal.example",
                                            "dr.smith@ortho.example", link_bytes(settings))


def test_smtp_starttls_not_offered_is_transient(settings, sink):
    with pytest.raises(TransientFailure):
        SmtpMailer(relay(sink.port, starttls=True)).send(
            "mailbridge@portal.example", "dr.smith@ortho.example", link_bytes(settings))
    assert sink.messages == []


def test_maildir_writes_a_readable_message(settings, tmp_path):
    path = tmp_path / "outbox"
    mailer = MaildirMailer(path, base_url="http://localhost:8080")
    raw = link_bytes(settings)
    mailer.send("mailbridge@portal.example", "dr.smith@ortho.example", raw)
    box = mailbox.Maildir(path, create=False)
    msg, = list(box)
    assert msg["Delivered-To"] == "dr.smith@ortho.example"
    assert msg["Return-Path"] == "<mailbridge@portal.example>"
    assert msg["Message-ID"] == compose_id(raw)
    assert not list((path / "tmp").iterdir())  # written in tmp/, moved to new/
    assert mailer.find_links(raw) == [LINK]


def test_maildir_finds_no_links_in_other_mail(settings, tmp_path):
    mailer = MaildirMailer(tmp_path / "outbox", base_url="http://localhost:8080")
    msg = compose.notice_email(settings, to="jane.doe@clinic.example", code="no_attachments",
                               details={}, in_reply_to=None)
    assert mailer.find_links(bytes(msg)) == []


def test_make_mailer_follows_the_transport_setting(tmp_path):
    local = make_mailer(settings_for(tmp_path))
    assert isinstance(local, MaildirMailer)
    assert local.path == tmp_path / "outbox"
    smtp = make_mailer(settings_for(tmp_path, MAILBRIDGE_OUTBOUND_TRANSPORT="smtp",
                                    MAILBRIDGE_OUTBOUND_SMTP_PORT="2600"))
    assert isinstance(smtp, SmtpMailer)
    assert smtp.relay.port == 2600


# --- TLS on the way out ----------------------------------------------------------------------


@pytest.fixture
def relay_cert(tmp_path):
    return make_certificate(tmp_path / "tls", "relay")


def test_starttls_relay_verified_with_the_configured_ca(settings, relay_cert):
    with SmtpSink(tls=relay_cert.server_context()) as sink:
        SmtpMailer(relay(sink.port, tls="starttls", ca_file=str(relay_cert.cert))).send(
            "mailbridge@portal.example", "dr.smith@ortho.example", link_bytes(settings))
        assert len(sink.wait_for(1)) == 1


def test_implicit_tls_relay_verified_with_the_configured_ca(settings, relay_cert):
    with SmtpSink(tls=relay_cert.server_context(), implicit=True) as sink:
        SmtpMailer(relay(sink.port, tls="implicit", ca_file=str(relay_cert.cert))).send(
            "mailbridge@portal.example", "dr.smith@ortho.example", link_bytes(settings))
        assert len(sink.wait_for(1)) == 1


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_relay_certificate_not_from_a_trusted_ca_is_transient_and_nothing_sent(
        settings, relay_cert, tls):
    with SmtpSink(tls=relay_cert.server_context(), implicit=tls == "implicit") as sink:
        with pytest.raises(TransientFailure) as info:
            SmtpMailer(relay(sink.port, tls=tls)).send(  # the system's CAs only
                "mailbridge@portal.example", "dr.smith@ortho.example", link_bytes(settings))
        assert "not trusted" in info.value.reason and "[outbound.smtp] ca_file" in info.value.reason
        assert sink.attempts == 0 and sink.messages == []


def test_relay_certificate_for_another_name_is_refused(settings, tmp_path):
    # Trusted CA, but issued for another host: a relay impersonated with someone's real cert.
    elsewhere = make_certificate(tmp_path / "tls", "elsewhere", names="DNS:relay.elsewhere.example")
    with SmtpSink(tls=elsewhere.server_context()) as sink:
        with pytest.raises(TransientFailure, match="not trusted"):
            SmtpMailer(relay(sink.port, tls="starttls", ca_file=str(elsewhere.cert))).send(
                "mailbridge@portal.example", "dr.smith@ortho.example", link_bytes(settings))
        assert sink.messages == []


def test_unreadable_ca_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^\[outbound.smtp\] ca_file"):
        SmtpMailer(relay(25, tls="starttls", ca_file=str(tmp_path / "missing.pem")))


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LOCALHOST.", True),
    ("192.0.2.10", False), ("10.0.0.1", False), ("relay.example", False),
    ("localhost.evil.example", False), ("127.0.0.1.evil.example", False), ("::ffff:8.8.8.8", False),
])
def test_only_loopback_relays_count_as_this_machine(host, loopback):
    assert is_loopback(host) is loopback
    assert phi_in_clear_refused(RelaySettings(host=host, tls="none")) is not loopback
    assert not phi_in_clear_refused(RelaySettings(host=host, tls="starttls"))


def test_phi_is_held_for_a_clear_text_relay_elsewhere_and_links_still_go(settings):
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to listen on")
    with SmtpSink(host=address) as sink:
        mailer = SmtpMailer(RelaySettings(host=address, port=sink.port, tls="none",
                                          timeout_seconds=5))
        with pytest.raises(HeldBack, match=r"\[outbound.smtp\] tls"):
            mailer.send("mailbridge@portal.example", "jane.doe@clinic.example",
                        link_bytes(settings), carries_phi=True)
        assert sink.attempts == 0
        mailer.send("mailbridge@portal.example", "dr.smith@ortho.example",
                    link_bytes(settings), carries_phi=False)
        assert [m.rcpt_tos for m in sink.wait_for(1)] == [["dr.smith@ortho.example"]]


def test_phi_may_go_in_clear_to_a_loopback_relay(settings, sink):
    SmtpMailer(relay(sink.port, tls="none")).send(
        "mailbridge@portal.example", "jane.doe@clinic.example", link_bytes(settings),
        carries_phi=True)
    assert len(sink.wait_for(1)) == 1

