"""The transports against a real SMTP server and a real Maildir: what is delivered, and which
relay answers count as permanent or transient."""

from __future__ import annotations

import mailbox
from email import policy
from email.parser import BytesParser

import pytest

from mailbridge.config import RelaySettings, load_settings
from mailbridge.outbound import compose
from mailbridge.outbound.mailer import (
    MaildirMailer,
    PermanentFailure,
    SmtpMailer,
    TransientFailure,
    make_mailer,
)
from tests.smtp_sink import SmtpSink, free_port

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
