"""SMTP intake over real sockets: what is refused in the dialogue, and 250 only once the
message is committed; database or disk trouble answers 451/452 and keeps nothing."""

from __future__ import annotations

import smtplib
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor

import peewee
import pytest

from mailbridge import spool
from mailbridge.models import InboundMessage
from mailbridge.receive.smtp import make_controller
from tests.conftest import SHARING, free_port
from tests.helpers import MEMBER, add_jane, share_message, wire


@pytest.fixture
def intake(runtime):
    """The SMTP listener alone (no worker), so tests can look at the spool it leaves."""
    import dataclasses

    settings = dataclasses.replace(
        runtime.settings,
        smtp=dataclasses.replace(runtime.settings.smtp, port=free_port(),
                                 max_message_bytes=2 * 1024 * 1024))
    rt = dataclasses.replace(runtime, settings=settings)
    executor = ThreadPoolExecutor(max_workers=2)
    controller = make_controller(rt, executor)
    controller.start()
    yield rt, settings.smtp.port
    controller.stop()
    executor.shutdown()


def send(port, raw, *, sender=MEMBER, rcpts=(SHARING,)):
    raw = wire(raw)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        return smtp.sendmail(sender, list(rcpts), raw)


def test_member_message_is_committed_before_250(intake):
    rt, port = intake
    add_jane()
    raw = bytes(share_message())
    send(port, raw)  # raises unless 250
    row = InboundMessage.get()
    assert row.state == "queued" and row.channel == "smtp"
    assert row.envelope_from == MEMBER and row.envelope_to == [SHARING]
    assert row.client_ip == "127.0.0.1" and row.protocol == "ESMTP"
    stored = spool.read_raw(rt, row).replace(b"\r\n", b"\n").rstrip()
    assert stored == raw.replace(b"\r\n", b"\n").rstrip()


def test_spooled_raw_message_is_encrypted_on_disk(intake):
    rt, port = intake
    add_jane()
    send(port, bytes(share_message(note="UNIQUE-MARKER-7731")))
    files = [p for p in rt.settings.spool_dir.rglob("*") if p.is_file()]
    assert files
    assert all(b"UNIQUE-MARKER-7731" not in p.read_bytes() for p in files)


@pytest.mark.parametrize("rcpt", ["someone@portal.example", "share@elsewhere.example",
                                  "reply@reply.portal.example"])
def test_unknown_recipient_refused_at_rcpt(intake, rcpt):
    _, port = intake
    add_jane()
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        send(port, bytes(share_message()), rcpts=[rcpt])
    code, text = info.value.recipients[rcpt]
    assert code == 550 and text.startswith(b"5.1.1")
    assert InboundMessage.select().count() == 0


def test_plus_and_reply_addresses_accepted(intake):
    _, port = intake
    add_jane()
    send(port, bytes(share_message()),
         rcpts=["share+dr.smith=ortho.example@portal.example", "reply+abc123@reply.portal.example"])
    assert InboundMessage.select().count() == 1


def test_non_member_refused_with_571_and_nothing_spooled(intake):
    _, port = intake
    add_jane()
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(port, bytes(share_message(sender="mallory@evil.example")),
             sender="mallory@evil.example")
    assert info.value.smtp_code == 550 and info.value.smtp_error.startswith(b"5.7.1")
    assert InboundMessage.select().count() == 0


def test_disabled_member_refused(intake):
    from mailbridge.members import disable_member

    _, port = intake
    add_jane()
    disable_member(MEMBER)
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(port, bytes(share_message()))
    assert info.value.smtp_code == 550


def test_oversize_refused_with_552_534(intake):
    _, port = intake
    add_jane()
    big = bytes(share_message(attachments=[("big.pdf", b"%PDF-1.4\n" + b"0" * 3_000_000)]))
    # smtplib announces SIZE, so this is refused at MAIL FROM ...
    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        send(port, big)
    assert info.value.smtp_code == 552 and info.value.smtp_error.startswith(b"5.3.4")
    # ... and a client that does not announce it is refused after DATA.
    with smtplib.SMTP("127.0.0.1", port) as smtp:
        smtp.ehlo()
        smtp.esmtp_features.pop("size", None)
        with pytest.raises(smtplib.SMTPDataError) as info:
            smtp.sendmail(MEMBER, [SHARING], wire(big))
    assert info.value.smtp_code == 552 and info.value.smtp_error.startswith(b"5.3.4")
    assert InboundMessage.select().count() == 0


def test_database_unavailable_answers_451_then_recovers(intake, settings):
    rt, port = intake
    add_jane()
    if settings.database.url.startswith("sqlite"):
        # Another process holds the write lock for longer than our busy timeout.
        path = settings.database.url[len("sqlite:///"):]
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        release = blocker.close
    else:
        name = settings.database.url.rsplit("/", 1)[1]
        admin = peewee.PostgresqlDatabase("postgres", host="127.0.0.1", user="postgres")
        admin.execute_sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        admin.execute_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))

        def release():
            admin.execute_sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
            admin.close()
    try:
        with pytest.raises(smtplib.SMTPDataError) as info:
            send(port, bytes(share_message()))
        assert info.value.smtp_code == 451 and info.value.smtp_error.startswith(b"4.3.0")
    finally:
        release()
    assert not [p for p in rt.settings.spool_dir.rglob("*") if p.is_file()], "blob left behind"
    send(port, bytes(share_message()))  # the sender's MTA retries: now it goes through
    assert InboundMessage.select().count() == 1


def test_disk_full_answers_452_and_keeps_nothing(intake, tmp_path):
    rt, port = intake
    add_jane()
    rt.settings.spool_dir.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs",
                              str(rt.settings.spool_dir)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(smtplib.SMTPDataError) as info:
            send(port, bytes(share_message(attachments=[("scan.pdf", b"%PDF-1.4\n" +
                                                         b"1" * 200_000)])))
        assert info.value.smtp_code == 452 and info.value.smtp_error.startswith(b"4.3.1")
        assert InboundMessage.select().count() == 0
        send(port, bytes(share_message()))  # a small message still fits
        assert InboundMessage.select().count() == 1
    finally:
        subprocess.run(["umount", str(rt.settings.spool_dir)], check=False)
