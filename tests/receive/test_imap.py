"""IMAP intake against a real Dovecot: messages appended as a mail client would become shares
exactly once — with IDLE, without it, across a crash, a server restart and a UIDVALIDITY
change — and mail from non-members goes to the failed folder without a word."""

from __future__ import annotations

import logging
import secrets
import time

import pytest

from mailbridge.clock import system_clock
from mailbridge.receive import spool, worker
from mailbridge.receive.imap import mailbox_of, poll_once
from mailbridge.receive.imap_intake import Verdict
from mailbridge.runtime import build_runtime
from mailbridge.store import schema
from mailbridge.store.models import InboundMessage, OutboundMessage, Share
from tests import dovecot
from tests.conftest import SHARING, make_settings, start_service
from tests.dkim_helpers import sign
from tests.dovecot import Dovecot
from tests.helpers import MEMBER, add_jane, share_message, wire

pytestmark = pytest.mark.slow

PROCESSED = "mailbridge.processed"  # Dovecot's Maildir++ separator is "."
FAILED = "mailbridge.failed"


@pytest.fixture(scope="module")
def server():
    dovecot.require()
    with Dovecot(spare=24) as running:
        yield running


@pytest.fixture
def user(server) -> str:
    """A mailbox of its own for each test on the shared server."""
    return server.fresh_user()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mailbridge.db'}"


@pytest.fixture
def services(tmp_path, sink, keyring):
    """Starts the whole service (SMTP, worker, IMAP poller, dispatcher to the sink)."""
    started = []

    def start(db_url: str, env: dict[str, str]):
        running = start_service(tmp_path, db_url, sink, keyring, **env)
        started.append(running)
        return running

    yield start
    for running in started:
        running.service.stop(timeout=10)


@pytest.fixture
def runtimes(tmp_path, keyring):
    """A runtime without threads, for tests that drive the poller and worker step by step."""
    opened = []

    def make(db_url: str, env: dict[str, str]):
        settings = make_settings(tmp_path / "data", db_url, **env)
        runtime = build_runtime(settings, master_key=secrets.token_bytes(32),
                                dnsfunc=keyring.dnsfunc)
        schema.upgrade(runtime.db, system_clock())
        opened.append(runtime)
        return runtime

    yield make
    for runtime in opened:
        runtime.db.close()


def signed(keyring, message) -> bytes:
    return sign(wire(message), "clinic.example", "mb2024", keyring.private_key)


def process_all(runtime) -> None:
    while worker.run_once(runtime, "test-node"):
        pass


def wait_until(condition, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def env_for(server, user, tmp_path, **extra) -> dict[str, str]:
    return dovecot.imap_env(server, user, tmp_path / "imap-password", **extra)


# --- a message in, links out -----------------------------------------------------------------


def test_appended_message_becomes_a_share_with_link_emails(server, user, services, tmp_path,
                                                           sqlite_url, keyring):
    running = services(sqlite_url, env_for(server, user, tmp_path, poll_seconds="5"))
    add_jane()
    recipients = ["dr.smith@ortho.example", "counsel@law.example"]
    server.append(signed(keyring, share_message(recipients=recipients)), user=user)

    received = running.sink.wait_for(3, timeout=15)
    running.drain()
    share = Share.get()
    assert sorted(g.address for g in share.grants) == sorted(recipients)
    assert sorted(r.rcpt_tos[0] for r in received if r.rcpt_tos != [MEMBER]) == sorted(recipients)
    assert [r.rcpt_tos for r in received].count([MEMBER]) == 1  # the receipt
    [row] = InboundMessage.select()
    assert row.channel == "imap" and row.state == "done"
    assert row.source_key.startswith(f"imap:{user}@127.0.0.1/INBOX:")
    # Moved out of the inbox, and never flagged as read by us (fetched with BODY.PEEK[]).
    assert server.count("INBOX", user) == 0 and server.count(PROCESSED, user) == 1
    assert server.seen(PROCESSED, user) == [False]


def test_idle_picks_up_new_mail_within_two_seconds(server, user, services, tmp_path, sqlite_url,
                                                   keyring):
    running = services(sqlite_url, env_for(server, user, tmp_path, poll_seconds="60"))
    add_jane()
    assert running.service.imap.ready.wait(10)
    time.sleep(0.5)  # in IDLE by now
    appended = time.monotonic()
    server.append(signed(keyring, share_message()), user=user)
    wait_until(lambda: InboundMessage.select().count() == 1, "the message to be spooled", 5)
    assert time.monotonic() - appended < 2.0
    running.sink.wait_for(2, timeout=15)
    assert Share.select().count() == 1


@pytest.mark.parametrize("capabilities", ["IMAP4rev1 LITERAL+ UIDPLUS", "IMAP4rev1 LITERAL+"],
                         ids=["copy-uid-expunge", "copy-expunge"])
def test_without_idle_or_move_it_polls_and_copies(capabilities, services, tmp_path, sqlite_url,
                                                   keyring):
    dovecot.require()
    with Dovecot(capabilities=capabilities) as plain:
        user = plain.users[0]
        running = services(sqlite_url, env_for(plain, user, tmp_path, poll_seconds="0.5"))
        add_jane()
        assert running.service.imap.ready.wait(10)
        plain.append(signed(keyring, share_message()), user=user)
        running.sink.wait_for(2, timeout=15)
        # MESSAGES counts messages flagged \Deleted too: 0 means really expunged.
        wait_until(lambda: plain.count("INBOX", user) == 0, "the inbox to be empty", 5)
        assert plain.count(PROCESSED, user) == 1
        assert Share.select().count() == 1 and InboundMessage.select().count() == 1


# --- exactly once ----------------------------------------------------------------------------


def test_crash_between_spooling_and_moving_makes_one_share(server, user, runtimes, db_url,
                                                           tmp_path, keyring):
    runtime = runtimes(db_url, env_for(server, user, tmp_path))
    add_jane()
    server.append(signed(keyring, share_message()), user=user)
    # What a poller killed after its commit and before its MOVE leaves behind: the message
    # spooled (and even processed) under its source key, and still in the inbox.
    [raw] = server.fetch_all("INBOX", user)
    key = mailbox_of(runtime.settings.imap).key(server.uidvalidity(user=user), 1)
    spool.enqueue(runtime, raw, channel="imap", envelope_from="", envelope_to=[SHARING],
                  source_key=key)
    process_all(runtime)

    stats = poll_once(runtime)  # the restarted poller
    process_all(runtime)
    assert stats[Verdict.ALREADY] == 1 and stats[Verdict.SPOOLED] == 0
    assert InboundMessage.select().count() == 1 and Share.select().count() == 1
    assert OutboundMessage.select().where(OutboundMessage.kind == "link").count() == 1
    assert server.count("INBOX", user) == 0 and server.count(PROCESSED, user) == 1


def test_uidvalidity_change_does_not_import_the_folder_again(server, user, runtimes, db_url,
                                                             tmp_path, keyring):
    runtime = runtimes(db_url, env_for(server, user, tmp_path))
    add_jane()
    # No attachment: the member gets one notice — a second import would send a second one.
    server.append(signed(keyring, share_message(attachments=[])), user=user)
    uidvalidity = server.uidvalidity(user=user)
    [raw] = server.fetch_all("INBOX", user)
    spool.enqueue(runtime, raw, channel="imap", envelope_from="", envelope_to=[SHARING],
                  source_key=mailbox_of(runtime.settings.imap).key(uidvalidity, 1))
    process_all(runtime)

    server.set_uidvalidity(uidvalidity + 1000, user=user)  # the server rebuilt the folder
    server.append(signed(keyring, share_message()), user=user)  # and new mail still counts
    stats = poll_once(runtime)
    process_all(runtime)
    assert stats[Verdict.REPEAT] == 1 and stats[Verdict.SPOOLED] == 1
    # The metrics count the new message as accepted; the repeat is neither accepted nor refused.
    sample = runtime.metrics.registry.get_sample_value
    assert sample("mailbridge_intake_accepted_total", {"channel": "imap"}) == 1
    assert sum(sample("mailbridge_intake_refused_total", {"channel": "imap", "reason": r})
               for r in ("not_a_member", "too_big", "unreadable")) == 0
    assert InboundMessage.select().count() == 2 and Share.select().count() == 1
    assert OutboundMessage.select().where(OutboundMessage.kind == "notice").count() == 1
    assert server.count("INBOX", user) == 0 and server.count(PROCESSED, user) == 2


def test_dovecot_restart_during_idle_reconnects_and_continues(services, tmp_path, sqlite_url,
                                                              keyring, caplog):
    dovecot.require()
    caplog.set_level(logging.INFO, logger="mailbridge")
    with Dovecot() as own:
        user = own.users[0]
        running = services(sqlite_url, env_for(own, user, tmp_path, poll_seconds="60"))
        add_jane()
        assert running.service.imap.ready.wait(10)
        time.sleep(0.5)  # in IDLE by now
        own.restart()
        own.append(signed(keyring, share_message()), user=user)
        wait_until(lambda: own.count(PROCESSED, user) == 1, "the message to be moved", 20)
        running.sink.wait_for(2, timeout=15)
        assert Share.select().count() == 1
        messages = [r.getMessage() for r in caplog.records if r.name.startswith("mailbridge")]
    assert sum("connection lost" in m for m in messages) == 1
    assert sum(m == "imap: reconnected" for m in messages) == 1
    assert not any(user in m or "secret" in m for m in messages)


# --- the same rules as SMTP ------------------------------------------------------------------


def test_non_member_goes_to_the_failed_folder_without_any_reply(server, user, services,
                                                                tmp_path, sqlite_url):
    running = services(sqlite_url, env_for(server, user, tmp_path))
    add_jane()
    server.append(wire(share_message(sender="mallory@evil.example")), user=user)
    wait_until(lambda: server.count(FAILED, user) == 1, "the failed folder")
    running.drain()
    time.sleep(0.5)  # a reply, if any, would be on its way by now
    assert server.count("INBOX", user) == 0 and server.count(PROCESSED, user) == 0
    assert Share.select().count() == 0 and InboundMessage.select().count() == 0
    assert OutboundMessage.select().count() == 0 and running.sink.messages == []
    sample = running.runtime.metrics.registry.get_sample_value
    assert sample("mailbridge_intake_refused_total",
                  {"channel": "imap", "reason": "not_a_member"}) == 1
    assert sample("mailbridge_intake_accepted_total", {"channel": "imap"}) == 0


AUTH_RESULTS = (b"Authentication-Results: mx.google.com;\r\n"
                b"       dkim=pass header.i=@clinic.example header.s=mb2024;\r\n"
                b"       dmarc=pass (p=NONE) header.from=clinic.example\r\n")


@pytest.mark.parametrize("trusted,shares", [("mx.google.com", 1), ("mx.portal.example", 0)],
                         ids=["provider-trusted", "provider-not-trusted"])
def test_provider_authentication_results_count_only_when_trusted(trusted, shares, server, user,
                                                                 runtimes, sqlite_url,
                                                                 tmp_path):
    env = env_for(server, user, tmp_path)
    env["MAILBRIDGE_SENDERS_TRUSTED_AUTHSERV_IDS"] = trusted
    runtime = runtimes(sqlite_url, env)
    add_jane()
    server.append(AUTH_RESULTS + wire(share_message()), user=user)  # no DKIM signature
    poll_once(runtime)
    process_all(runtime)
    assert Share.select().count() == shares
    if not shares:
        row = InboundMessage.get()
        assert row.state == "ignored" and "not authenticated" in row.reason


def test_return_path_stands_in_for_the_envelope_sender(server, user, runtimes, sqlite_url,
                                                       tmp_path, keyring):
    runtime = runtimes(sqlite_url, env_for(server, user, tmp_path))
    add_jane()
    # Delivered with MAIL FROM:<> (a notification): never answered, not even with a notice.
    server.append(b"Return-Path: <>\r\n" + signed(keyring, share_message(attachments=[])),
                  user=user)
    poll_once(runtime)
    process_all(runtime)
    row = InboundMessage.get()
    assert row.state == "ignored" and "null-sender" in row.reason
    assert OutboundMessage.select().count() == 0


# --- a backlog -------------------------------------------------------------------------------

BACKLOG = 1000


def test_backlog_of_a_thousand_messages_drains_each_once(server, user, services, tmp_path,
                                                         sqlite_url):
    add = {"poll_seconds": "60", "batch_size": "100"}
    env = env_for(server, user, tmp_path, **add)
    env["MAILBRIDGE_SENDERS_REQUIRE_AUTHENTICATION"] = "false"
    env["MAILBRIDGE_OUTBOUND_TRANSPORT"] = "maildir"
    # The member exists before the poller starts, so nothing races the first pass.
    setup = make_settings(tmp_path / "data", sqlite_url, **env)
    runtime = build_runtime(setup, master_key=secrets.token_bytes(32))
    schema.upgrade(runtime.db, system_clock())
    add_jane()
    runtime.db.close()
    messages = [wire(share_message(note=f"message {n}")) for n in range(BACKLOG)]
    server.append(*messages, user=user)
    assert server.count("INBOX", user) == BACKLOG

    started = time.monotonic()
    running = services(sqlite_url, env)
    running.service.imap.ready.wait(60)
    running.drain(timeout=60)
    processed_in = time.monotonic() - started
    totals = running.service.imap.totals
    rate = totals[Verdict.SPOOLED] / (totals.last_spooled - totals.first_fetch)
    print(f"\nIMAP backlog: {BACKLOG} messages spooled at {rate:.0f} messages/s; all "
          f"processed into shares in {processed_in:.1f} s")

    rows = list(InboundMessage.select())
    assert len(rows) == BACKLOG and len({r.source_key for r in rows}) == BACKLOG
    assert len({r.raw_sha256 for r in rows}) == BACKLOG
    assert {r.state for r in rows} == {"done"} and Share.select().count() == BACKLOG
    assert server.count("INBOX", user) == 0 and server.count(PROCESSED, user) == BACKLOG
