"""The purge job: what retention allows to go, and nothing else."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from mailbridge.clock import ManualClock
from mailbridge.receive import spool
from mailbridge.shares import purge
from mailbridge.store import blobs
from mailbridge.store.blobs import StorageError
from mailbridge.store.models import (
    AccessRequest,
    AuditEvent,
    Document,
    Grant,
    InboundMessage,
    OneTimeCode,
    PasswordReset,
    Share,
    WebSession,
)
from tests.helpers import add_jane, share_message
from tests.portal_helpers import make_account
from tests.shares.test_notify import (
    SMITH,
    configured,
    grant_of,
    shared,
)


def make_grant(now, hours=24, address="dr@x.example", state="pending"):
    member = add_jane() if not Share.select().exists() else Share.get().sender
    share = Share.get_or_none() or Share.create(
        clinic=member.clinic, sender=member, created_at=now, dedupe_key="k",
        reply_key_hash="r")
    return Grant.create(share=share, address=address, token_hash=address, state=state,
                        deadline=now + dt.timedelta(hours=hours), created_at=now)


def test_purge_deletes_only_what_retention_allows(runtime):
    rt = configured(runtime)  # spool_days 30, session_days 30, code_days 1
    share = shared(rt)
    done = InboundMessage.get()
    waiting = spool.enqueue(rt, b"Subject: x\r\n\r\nx\r\n", channel="smtp", envelope_from="",
                            envelope_to=["share@portal.example"])
    account = make_account(rt, SMITH)
    grant = grant_of(share, SMITH)
    start = rt.clock()
    WebSession.create(id_hash="ended-long-ago", account=account, created_at=start,
                      last_seen_at=start, ended_at=start)
    WebSession.create(id_hash="abandoned", account=account, created_at=start,
                      last_seen_at=start)
    OneTimeCode.create(grant=grant, code_hash="used", created_at=start,
                       expires_at=start + dt.timedelta(minutes=10), used_at=start)
    for state in ("unverified", "open"):  # a code never entered; a request the sender has
        AccessRequest.create(share=share, origin=grant, address="ma@x.example", state=state,
                             created_at=start, code_hash=state, code_expires_at=start,
                             expires_at=start + dt.timedelta(hours=72))
    PasswordReset.create(account=account, token_hash="old", created_at=start,
                         expires_at=start + dt.timedelta(hours=1))

    rt.clock.advance(days=31)
    now = rt.clock()
    recent = spool.enqueue(rt, b"Subject: y\r\n\r\ny\r\n", channel="smtp", envelope_from="",
                           envelope_to=["share@portal.example"])
    with rt.db.atomic():
        spool.conclude(recent, "ignored", "ignore", "test", now)
    WebSession.create(id_hash="ended-today", account=account, created_at=now,
                      last_seen_at=now, ended_at=now)
    WebSession.create(id_hash="open", account=account, created_at=now, last_seen_at=now)
    OneTimeCode.create(grant=grant, code_hash="fresh", created_at=now,
                       expires_at=now + dt.timedelta(minutes=10))
    documents = [(d.blob_id, bytes(d.blob_key)) for d in Document.select()]
    events = AuditEvent.select().count()

    assert purge.purge(rt) == 1 + 2 + 2 + 1  # raw message, sessions, codes, reset link
    assert InboundMessage.get_by_id(done.id).purged_at == now
    with pytest.raises(StorageError):
        spool.read_raw(rt, InboundMessage.get_by_id(done.id))
    for kept in (waiting, recent):
        assert InboundMessage.get_by_id(kept.id).purged_at is None
        assert spool.read_raw(rt, kept)
    assert {s.id_hash for s in WebSession.select()} == {"ended-today", "open"}
    assert [c.code_hash for c in OneTimeCode.select()] == ["fresh"]
    assert [r.state for r in AccessRequest.select()] == ["open"]
    assert not PasswordReset.select().exists()
    # Never documents or the audit trail.
    assert [blobs.read_all(rt.documents, b, k)[:5] for b, k in documents] == [b"%PDF-"]
    assert AuditEvent.select().count() == events
    assert Share.get_by_id(share.id) and grant_of(share, SMITH)
    assert purge.purge(rt) == 0


def test_a_backlog_is_deleted_in_batches_and_all_of_it(runtime):
    rt = configured(runtime)
    account = make_account(rt, SMITH)
    start = rt.clock()
    WebSession.insert_many([dict(id_hash=f"s{i}", account=account, created_at=start,
                                 last_seen_at=start, ended_at=start) for i in range(7)]).execute()
    rt.clock.advance(days=31)
    WebSession.create(id_hash="open", account=account, created_at=rt.clock(),
                      last_seen_at=rt.clock())
    assert purge.purge(rt, delete_batch=3) == 7  # three statements: 3, 3 and 1
    assert [s.id_hash for s in WebSession.select()] == ["open"]
    assert purge.purge(rt, delete_batch=3) == 0


# --- the command line ------------------------------------------------------------------------


def test_a_failed_message_whose_raw_copy_was_purged_cannot_be_retried(runtime):
    from mailbridge.receive import spool
    from tests.helpers import wire

    clock = ManualClock(dt.datetime(2026, 11, 28, 12, 0))
    rt = dataclasses.replace(runtime, clock=clock)
    row = spool.enqueue(rt, wire(share_message()), channel="smtp", envelope_from="",
                        envelope_to=["share@portal.example"])
    spool.park_failed(rt, row, "simulated")
    clock.advance(days=rt.settings.retention.spool_days + 1)
    assert purge.purge(rt) >= 1
    assert not spool.requeue(rt, row.id)


# --- faults ------------------------------------------------------------------------------
