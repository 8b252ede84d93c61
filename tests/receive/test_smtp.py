"""SMTP intake over real sockets: what is refused in the dialogue, and 250 only once the
message is committed; database or disk trouble answers 451/452 and keeps nothing."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
import shutil
import smtplib
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor

import peewee
import pytest

from mailbridge.config import ConfigError
from mailbridge.receive import spool
from mailbridge.receive.smtp import make_controller
from mailbridge.receive.tls import ServerCertificate
from mailbridge.receive.trace import received_header
from mailbridge.store.models import InboundMessage
from tests.conftest import SHARING, free_port
from tests.helpers import MEMBER, add_jane, share_message, wire
from tests.tls_helpers import make_certificate, served_fingerprint, tls_intake


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


def split_trace(stored: bytes) -> tuple[bytes, bytes]:
    """(the Received header intake put on top, unfolded; the message as it was sent)."""
    lines = stored.split(b"\r\n")
    end = 1 + next(i for i, line in enumerate(lines[1:]) if not line[:1].isspace())
    return b" ".join(line.strip() for line in lines[:end]), b"\r\n".join(lines[end:])


def test_member_message_is_committed_before_250(intake):
    rt, port = intake
    add_jane()
    raw = bytes(share_message())
    send(port, raw)  # raises unless 250
    row = InboundMessage.get()
    assert row.state == "queued" and row.channel == "smtp"
    assert row.envelope_from == MEMBER and row.envelope_to == [SHARING]
    assert row.client_ip == "127.0.0.1" and row.protocol == "ESMTP"
    trace, stored = split_trace(spool.read_raw(rt, row))
    assert trace.startswith(b"Received: from ") and b" with ESMTP id " in trace
    assert stored.replace(b"\r\n", b"\n").rstrip() == raw.replace(b"\r\n", b"\n").rstrip()


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
    from mailbridge.shares.members import disable_member

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


# --- budgets and early refusal -------------------------------------------------------------


def limited(intake, **smtp):
    """The intake's runtime with other [smtp] budgets, and loopback not a trusted relay (so
    the test client is an ordinary internet client)."""
    import dataclasses

    rt, port = intake
    settings = dataclasses.replace(
        rt.settings, smtp=dataclasses.replace(rt.settings.smtp, **smtp),
        senders=dataclasses.replace(rt.settings.senders, trusted_relays=("192.0.2.0/24",)))
    object.__setattr__(rt, "settings", settings)  # the controller's handler holds `rt`
    return rt, port


def test_client_over_its_hourly_message_budget_is_told_to_come_back_later(intake):
    rt, port = limited(intake, max_messages_per_hour_per_ip=2)
    add_jane()
    send(port, bytes(share_message()))
    send(port, bytes(share_message()))
    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        send(port, bytes(share_message()))
    assert info.value.smtp_code == 451 and info.value.smtp_error.startswith(b"4.7.1")
    assert InboundMessage.select().count() == 2


def test_sender_over_its_hourly_byte_budget_is_refused(intake):
    rt, port = limited(intake, max_bytes_per_hour_per_sender=120_000)
    add_jane()
    big = bytes(share_message(attachments=[("scan.pdf", b"%PDF-1.4\n" + b"x" * 60_000)]))
    send(port, big)
    # smtplib declares SIZE, so the refusal comes at MAIL FROM ...
    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        send(port, big)
    assert info.value.smtp_code == 451 and info.value.smtp_error.startswith(b"4.7.1")
    # ... and a client that declares nothing is refused once the message is in.
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail(MEMBER)[0] == 250 and smtp.rcpt(SHARING)[0] == 250
        code, text = smtp.data(wire(big))
    assert code == 451 and text.startswith(b"4.7.1")
    assert InboundMessage.select().count() == 1
    # Another envelope sender (same client, no per-IP byte budget hit) still gets through.
    send(port, big, sender="frontdesk@clinic.example")
    assert InboundMessage.select().count() == 2


def test_declared_size_over_the_budget_is_refused_before_data(intake):
    rt, port = limited(intake, max_bytes_per_hour_per_ip=50_000)
    add_jane()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()
        code, text = smtp.mail(MEMBER, options=["SIZE=80000"])
    assert code == 451 and text.startswith(b"4.7.1")


def test_trusted_relay_has_no_per_ip_budget(intake):
    rt, port = limited(intake, max_messages_per_hour_per_ip=1)
    import dataclasses

    object.__setattr__(rt, "settings", dataclasses.replace(
        rt.settings, senders=dataclasses.replace(rt.settings.senders,
                                                 trusted_relays=("127.0.0.1",))))
    add_jane()
    for _ in range(3):
        send(port, bytes(share_message()))
    assert InboundMessage.select().count() == 3


def test_header_watch_refuses_without_keeping_the_body():
    import asyncio

    from mailbridge.receive.header_watch import END_OF_DATA, HeaderWatch

    async def run():
        reader = asyncio.StreamReader(limit=1 << 16)
        reader.feed_data(b"From: eve@evil.example\r\nSubject: x\r\n\r\n"
                         + b"A" * 70 + b"\r\n" * 1 + (b"B" * 76 + b"\r\n") * 20_000
                         + b"C" * 200_000 + b"\r\n" + END_OF_DATA + b"QUIT\r\n")
        seen: list[bytes] = []

        async def decide(header: bytes):
            seen.append(header)
            return "550 5.7.1 no"

        watch = HeaderWatch(reader, decide)
        returned = []
        while True:
            line = await watch.readuntil(b"\r\n")
            returned.append(line)
            if line == END_OF_DATA:
                break
        return seen, returned, watch, await reader.readuntil(b"\r\n")

    # In a thread of its own: the browser tests' Playwright keeps a loop in the main thread.
    with ThreadPoolExecutor(max_workers=1) as pool:
        seen, returned, watch, after = pool.submit(asyncio.run, run()).result()
    assert seen == [b"From: eve@evil.example\r\nSubject: x\r\n"]
    # The body never reaches aiosmtpd: the header lines, then the end of DATA.
    assert returned == [b"From: eve@evil.example\r\n", b"Subject: x\r\n", END_OF_DATA]
    assert watch.refusal == "550 5.7.1 no"
    assert after == b"QUIT\r\n"  # the rest of DATA was read and thrown away, nothing more


def test_non_member_refused_while_data_arrives_and_the_session_goes_on(intake):
    _, port = intake
    add_jane()
    stranger = bytes(share_message(sender="eve@evil.example",
                                   attachments=[("big.pdf", b"%PDF-1.4\n" + b"x" * 500_000)]))
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        with pytest.raises(smtplib.SMTPDataError) as info:
            smtp.sendmail("eve@evil.example", [SHARING], wire(stranger))
        assert info.value.smtp_code == 550 and info.value.smtp_error.startswith(b"5.7.1")
        smtp.sendmail(MEMBER, [SHARING], wire(bytes(share_message())))  # same connection
    assert InboundMessage.select().count() == 1
# --- TLS on the way in -----------------------------------------------------------------------


@pytest.fixture
def cert(tmp_path):
    return make_certificate(tmp_path / "tls", "intake")


def test_without_a_certificate_starttls_is_not_offered(intake):
    _, port = intake
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("starttls")


def test_starttls_with_a_certificate_and_the_receipt_says_esmtps(runtime, cert):
    add_jane()
    with tls_intake(runtime, cert) as intake, \
            smtplib.SMTP("127.0.0.1", intake.port, timeout=10) as smtp:
        smtp.ehlo("mail.clinic.example")
        assert smtp.has_extn("starttls")
        smtp.starttls(context=cert.client_context())  # verifies the certificate and name
        smtp.ehlo("mail.clinic.example")
        smtp.sendmail(MEMBER, [SHARING], wire(share_message()))
        row = InboundMessage.get()
        trace, _ = split_trace(spool.read_raw(intake.runtime, row))
    assert row.protocol == "ESMTPS"
    assert re.fullmatch(rb"Received: from mail\.clinic\.example \(\[127\.0\.0\.1\]\) by "
                        rb"portal\.example \(mailbridge\) with ESMTPS \(TLSv1\.[23] [A-Z0-9_-]+\)"
                        rb" id [0-9a-f]{16}; \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}",
                        trace), trace


def test_plain_delivery_still_works_when_tls_is_only_offered(runtime, cert):
    add_jane()
    with tls_intake(runtime, cert) as intake:
        send(intake.port, bytes(share_message()))
        assert InboundMessage.get().protocol == "ESMTP"


def test_require_tls_accepts_after_starttls(runtime, cert):
    add_jane()
    with tls_intake(runtime, cert, require_tls=True) as intake, \
            smtplib.SMTP("127.0.0.1", intake.port, timeout=10) as smtp:
        smtp.starttls(context=cert.client_context())
        assert smtp.sendmail(MEMBER, [SHARING], wire(share_message())) == {}
    assert InboundMessage.get().protocol == "ESMTPS"


def test_implicit_tls_listener_accepts_and_records_esmtps(runtime, cert):
    add_jane()
    with tls_intake(runtime, cert, implicit=True) as intake:
        with smtplib.SMTP_SSL("127.0.0.1", intake.implicit_port, timeout=10,
                              context=cert.client_context()) as smtp:
            smtp.ehlo("mail.clinic.example")
            assert not smtp.has_extn("starttls")  # already TLS
            smtp.sendmail(MEMBER, [SHARING], wire(share_message()))
        row = InboundMessage.get()
        trace, _ = split_trace(spool.read_raw(intake.runtime, row))
    assert row.protocol == "ESMTPS" and b" with ESMTPS (TLSv1." in trace


def test_reload_serves_a_renewed_certificate_and_keeps_it_when_the_next_is_bad(
        runtime, tmp_path, caplog):
    first = make_certificate(tmp_path / "tls", "first")
    second = make_certificate(tmp_path / "tls", "second")
    live = make_certificate(tmp_path / "live", "live")
    shutil.copy(first.cert, live.cert)
    shutil.copy(first.key, live.key)
    with tls_intake(runtime, live, implicit=True) as intake:
        assert served_fingerprint("127.0.0.1", intake.port) == first.fingerprint
        with smtplib.SMTP("127.0.0.1", intake.port, timeout=10) as open_before:
            open_before.starttls(context=first.client_context())
            shutil.copy(second.cert, live.cert)
            shutil.copy(second.key, live.key)
            assert intake.certificate.reload()
            assert served_fingerprint("127.0.0.1", intake.port) == second.fingerprint
            assert served_fingerprint("127.0.0.1", intake.implicit_port,
                                      starttls=False) == second.fingerprint
            assert open_before.noop()[0] == 250  # a connection keeps what it started with
        live.key.write_text("not a key\n")
        with caplog.at_level(logging.ERROR, logger="mailbridge.receive.tls"):
            assert not intake.certificate.reload()
        assert "[smtp] tls_key_file" in caplog.text
        assert served_fingerprint("127.0.0.1", intake.port) == second.fingerprint


@pytest.mark.parametrize("problem, key", [
    ("missing certificate", "[smtp] tls_cert_file"),
    ("key is not a key", "[smtp] tls_key_file"),
    ("key of another certificate", "[smtp] tls_key_file"),
    ("certificate is not a certificate", "[smtp] tls_cert_file"),
])
def test_certificate_problems_name_the_key(settings, tmp_path, problem, key):
    good = make_certificate(tmp_path / "tls", "good")
    other = make_certificate(tmp_path / "tls", "other")
    files = {"missing certificate": (tmp_path / "nope.pem", good.key),
             "key is not a key": (good.cert, good.cert),
             "key of another certificate": (good.cert, other.key),
             "certificate is not a certificate": (good.key, good.key)}[problem]
    smtp = dataclasses.replace(settings.smtp, tls_cert_file=str(files[0]),
                               tls_key_file=str(files[1]))
    with pytest.raises(ConfigError) as info:
        ServerCertificate(smtp)
    assert str(info.value).startswith(key)


def test_received_header_keeps_only_host_name_characters():
    header = received_header(helo="evil\rX-Injected: yes\n (spoof) by trusted;", client_ip="::1",
                             by="portal.example", protocol="ESMTP", trace_id="abc",
                             when=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    assert header == (b"Received: from evilX-Injected:yesspoofbytrusted ([IPv6:::1])\r\n"
                      b"\tby portal.example (mailbridge) with ESMTP id abc;\r\n"
                      b"\tFri, 02 Jan 2026 03:04:05 +0000\r\n")
    assert received_header(helo=None, client_ip="", by="p.example", protocol="SMTP").startswith(
        b"Received: from unknown ([unknown])")


# --- group commit --------------------------------------------------------------------------


@pytest.fixture
def wide_intake(intake):
    """The intake with four SMTP threads, so three sessions are handled at once."""
    rt, port = intake
    controller = make_controller(rt, ThreadPoolExecutor(max_workers=4))
    controller.port = free_port()
    controller.start()
    yield rt, controller.port
    controller.stop()


def spooled_files(rt) -> list:
    return [p for p in rt.settings.spool_dir.rglob("*") if p.is_file()
            and not p.name.endswith(".tmp")]


def wait_for(condition, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def lock_spool_table(settings):
    """Another connection holds the spool table's write lock until the returned function is
    called: an INSERT into it waits (SQLite: the database's write lock)."""
    if settings.database.url.startswith("sqlite"):
        blocker = sqlite3.connect(settings.database.url[len("sqlite:///"):], isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        return blocker.close
    admin = peewee.PostgresqlDatabase(settings.database.url.rsplit("/", 1)[1], host="127.0.0.1",
                                      user="postgres")
    admin.execute_sql("BEGIN")
    admin.execute_sql("LOCK TABLE inbound_message IN EXCLUSIVE MODE")

    def release():
        admin.execute_sql("ROLLBACK")
        admin.close()
    return release


def send_concurrently(port, first, others, rt) -> list:
    """Send `first`; once it waits for its commit, send `others` at once; each session's
    SMTP code (250, or the refusal's)."""
    def one(raw):
        try:
            send(port, raw)
            return 250
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code

    import time

    pool = ThreadPoolExecutor(max_workers=1 + len(others))
    futures = [pool.submit(one, first)]
    wait_for(lambda: len(spooled_files(rt)) >= 1)
    time.sleep(0.3)  # its commit is under way (and waiting for the lock)
    futures += [pool.submit(one, raw) for raw in others]
    wait_for(lambda: len(spooled_files(rt)) >= 1 + len(others))
    time.sleep(0.3)  # they wait for the commit in hand to end
    return [pool, futures]


def test_concurrent_sessions_messages_are_committed_together(wide_intake, settings, caplog):
    rt, port = wide_intake
    add_jane()
    caplog.set_level(logging.DEBUG, logger="mailbridge.receive.spool")
    messages = [bytes(share_message(subject=f"Plan {i}")) for i in range(3)]
    release = lock_spool_table(settings)
    try:
        pool, futures = send_concurrently(port, messages[0], messages[1:], rt)
        assert not any(f.done() for f in futures), "a 250 before the commit"
    finally:
        release()
    assert [f.result(timeout=30) for f in futures] == [250, 250, 250]
    pool.shutdown()
    groups = [r.getMessage() for r in caplog.records if "in one transaction" in r.getMessage()]
    assert groups == ["spool: 1 message(s) committed in one transaction",
                      "spool: 2 message(s) committed in one transaction"]
    assert InboundMessage.select().count() == 3
    if settings.database.url.startswith("postgresql"):
        # The database's own record: the last two rows were written by one transaction.
        xids = [x for (x,) in rt.db.execute_sql(
            "SELECT xmin::text FROM inbound_message ORDER BY id").fetchall()]
        assert xids[1] == xids[2] != xids[0]


def test_a_failing_group_commit_answers_451_to_each_message(wide_intake, settings, caplog):
    rt, port = wide_intake
    add_jane()
    caplog.set_level(logging.DEBUG, logger="mailbridge.receive.spool")
    messages = [bytes(share_message(subject=f"Plan {i}")) for i in range(3)]
    postgres = settings.database.url.startswith("postgresql")
    name = settings.database.url.rsplit("/", 1)[1]
    if postgres:  # SQLite gives up on a lock after its busy timeout; PostgreSQL is told to
        rt.db.execute_sql(f"ALTER DATABASE {name} SET lock_timeout = '1s'")
    release = lock_spool_table(settings)
    try:
        pool, futures = send_concurrently(port, messages[0], messages[1:], rt)
        codes = [f.result(timeout=60) for f in futures]
    finally:
        release()
        if postgres:
            rt.db.execute_sql(f"ALTER DATABASE {name} RESET lock_timeout")
    pool.shutdown()
    assert codes == [451, 451, 451]
    failed = [r.getMessage() for r in caplog.records if "commit of" in r.getMessage()]
    assert failed == ["spool: a commit of 1 message(s) failed",
                      "spool: a commit of 2 message(s) failed"]
    assert InboundMessage.select().count() == 0
    assert not spooled_files(rt), "blob left behind"
    send(port, bytes(share_message()))  # the senders' MTAs retry: now it goes through
    assert InboundMessage.select().count() == 1
