"""The outbox queue on SQLite and PostgreSQL: sealed at rest, claimed once, retried."""

from __future__ import annotations

import datetime as dt
import os
import threading
from email.message import EmailMessage
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from mailbridge.clock import ManualClock
from mailbridge.config import load_settings
from mailbridge.outbound import compose, outbox
from mailbridge.runtime import build_runtime
from mailbridge.store import schema
from mailbridge.store.models import OutboundMessage

SECRET_FILENAME = "tuckerman-plan-of-care.pdf"


@pytest.fixture
def clock():
    return ManualClock(dt.datetime(2026, 11, 28, 14, 0, 0))


@pytest.fixture
def runtime(tmp_path, clock, db_url):
    settings = load_settings(None, env={
        "MAILBRIDGE_SERVICE_BASE_URL": "http://localhost:8080",
        "MAILBRIDGE_ADDRESSES_SHARING": "share@portal.example",
        "MAILBRIDGE_ADDRESSES_REPLY_DOMAIN": "reply.portal.example",
        "MAILBRIDGE_OUTBOUND_FROM": "mailbridge@portal.example",
        "MAILBRIDGE_SERVICE_DATA_DIR": str(tmp_path),
        "MAILBRIDGE_DATABASE_URL": db_url,
        "MAILBRIDGE_OUTBOUND_MAX_ATTEMPTS": "4",
        "MAILBRIDGE_OUTBOUND_RETRY_BASE_SECONDS": "60",
        "MAILBRIDGE_OUTBOUND_RETRY_MAX_SECONDS": "150",
    })
    rt = build_runtime(settings, clock=clock, master_key=os.urandom(32))
    schema.upgrade(rt.db, clock())
    yield rt
    rt.db.close()


def receipt(runtime) -> EmailMessage:
    return compose.receipt_email(
        runtime.settings, to="jane.doe@clinic.example", sender_name="Jane Doe",
        share_title="POC for patient Rosalind Tuckerman", recipients=["dr.smith@ortho.example"],
        filenames=[SECRET_FILENAME], deadline_text="tomorrow 09:00",
        reply_address="reply+abc@reply.portal.example", in_reply_to=None)


def enqueue(runtime, n: int = 1) -> list[OutboundMessage]:
    with runtime.db.atomic():
        return [outbox.enqueue(runtime, receipt(runtime), kind="receipt",
                               to_addr="jane.doe@clinic.example") for _ in range(n)]


def reload(row: OutboundMessage) -> OutboundMessage:
    return OutboundMessage.get_by_id(row.id)


def test_enqueued_message_is_sealed_at_rest(runtime, tmp_path, db_url):
    msg = receipt(runtime)
    with runtime.db.atomic():
        row = outbox.enqueue(runtime, msg, kind="receipt", to_addr="jane.doe@clinic.example")
    row = reload(row)
    assert row.state == "queued"
    assert row.message_id == msg["Message-ID"]
    assert row.envelope_from == "mailbridge@portal.example"
    assert row.next_attempt_at == runtime.clock()
    assert SECRET_FILENAME.encode() not in bytes(row.sealed)
    # Nor anywhere in the database files (WAL included), where we can read them.
    files = list(Path(tmp_path).glob("mailbridge.db*"))
    assert files or not db_url.startswith("sqlite")
    for path in files:
        assert SECRET_FILENAME.encode() not in path.read_bytes()
    raw = outbox.open_message(runtime, row)
    assert SECRET_FILENAME.encode() in raw
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")


def test_enqueue_joins_the_callers_transaction(runtime):
    class Boom(Exception):
        pass

    with pytest.raises(Boom), runtime.db.atomic():
        outbox.enqueue(runtime, receipt(runtime), kind="receipt", to_addr="a@b.example")
        raise Boom
    assert OutboundMessage.select().count() == 0
    assert not runtime.wake_dispatcher.is_set()
    outbox.notify(runtime)
    assert runtime.wake_dispatcher.is_set()


def test_sealed_message_does_not_open_under_another_row(runtime):
    first, second = enqueue(runtime, 2)
    OutboundMessage.update(sealed=first.sealed).where(OutboundMessage.id == second.id).execute()
    assert outbox.open_message(runtime, reload(first))
    with pytest.raises(InvalidTag):  # bound to its own Message-ID and recipient
        outbox.open_message(runtime, reload(second))


def test_claim_takes_due_rows_once(runtime, clock):
    due, = enqueue(runtime)
    clock.advance(seconds=1)
    later, = enqueue(runtime)
    OutboundMessage.update(next_attempt_at=clock() + dt.timedelta(seconds=30)).where(
        OutboundMessage.id == later.id).execute()
    claimed = outbox.claim_due(runtime)
    assert [r.id for r in claimed] == [due.id]
    assert claimed[0].state == "sending" and claimed[0].attempts == 1
    assert outbox.claim_due(runtime) == []
    clock.advance(seconds=30)  # due now; the first row's lease (60 s) still holds
    assert [r.id for r in outbox.claim_due(runtime)] == [later.id]


def test_claim_respects_limit(runtime):
    enqueue(runtime, 5)
    assert len(outbox.claim_due(runtime, limit=3)) == 3
    assert len(outbox.claim_due(runtime, limit=3)) == 2


def test_lease_of_a_crashed_dispatcher_expires(runtime, clock):
    row, = enqueue(runtime)
    assert outbox.claim_due(runtime)
    clock.advance(seconds=runtime.settings.worker.lease_seconds - 1)
    assert outbox.claim_due(runtime) == []
    clock.advance(seconds=2)
    again = outbox.claim_due(runtime)
    assert [r.id for r in again] == [row.id]
    assert again[0].attempts == 2


def test_concurrent_claimers_never_share_a_row(runtime):
    rows = enqueue(runtime, 120)
    barrier = threading.Barrier(4)
    results: list[list[int]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def claimer(i: int) -> None:
        try:
            barrier.wait()
            while batch := outbox.claim_due(runtime, limit=7):
                results[i] += [r.id for r in batch]
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            runtime.db.close()

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    claimed = [i for r in results for i in r]
    assert sorted(claimed) == sorted(r.id for r in rows)  # each exactly once
    assert OutboundMessage.select().where(OutboundMessage.attempts != 1).count() == 0


def test_retry_backs_off_exponentially_then_fails(runtime, clock):
    row, = enqueue(runtime)
    delays = []
    for _ in range(3):
        claimed, = outbox.claim_due(runtime)
        assert outbox.mark_retry(runtime, claimed, "451 4.3.0 try later") == "queued"
        delays.append((reload(row).next_attempt_at - clock()).total_seconds())
        assert outbox.claim_due(runtime) == []
        clock.advance(seconds=delays[-1])
    assert delays == [60, 120, 150]  # base, doubled, then capped at retry_max_seconds
    claimed, = outbox.claim_due(runtime)
    assert claimed.attempts == 4
    assert outbox.mark_retry(runtime, claimed, "451 4.3.0 try later") == "failed"
    row = reload(row)
    assert row.state == "failed"
    assert row.last_error == "451 4.3.0 try later"
    clock.advance(hours=2)
    assert outbox.claim_due(runtime) == []


def test_sent_and_failed_rows_are_not_claimed_again(runtime, clock):
    sent, failed = enqueue(runtime, 2)
    a, b = outbox.claim_due(runtime)
    outbox.mark_sent(runtime, a)
    outbox.mark_failed(runtime, b, "recipient refused: 550 5.1.1 User unknown")
    assert reload(sent).state == "sent" and reload(sent).sent_at == clock()
    assert reload(failed).state == "failed"
    clock.advance(days=1)
    assert outbox.claim_due(runtime) == []


def test_released_rows_are_due_again_without_losing_an_attempt(runtime):
    row, = enqueue(runtime)
    claimed = outbox.claim_due(runtime)
    outbox.release(runtime, claimed)
    again, = outbox.claim_due(runtime)
    assert again.id == row.id and again.attempts == 1


def test_error_text_is_clipped_to_one_line(runtime):
    row, = enqueue(runtime)
    claimed, = outbox.claim_due(runtime)
    outbox.mark_retry(runtime, claimed, "451\r\n" + "x" * 2000)
    error = reload(row).last_error
    assert "\n" not in error and len(error) == outbox.MAX_ERROR_CHARS
