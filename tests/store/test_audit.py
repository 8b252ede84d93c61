"""The audit chain on SQLite and PostgreSQL: an intact trail verifies, and each way someone
with database access could doctor it — edit, delete, reorder, insert, cut the tail, forge a
pruning checkpoint — is caught and named."""

from __future__ import annotations

import datetime as dt
import threading

import peewee
import pytest

from mailbridge.store import audit, schema
from mailbridge.store.models import AuditCheckpoint, AuditEvent, AuditHead, Clinic
from mailbridge.store.states import Audit

START = dt.datetime(2026, 11, 2, 9, 0)


def trail(runtime, n: int = 10, start: dt.datetime = START) -> list[int]:
    """`n` events an hour apart; returns their ids in chain order."""
    for i in range(n):
        audit.record(runtime.audit_key, Audit.DOCUMENT_VIEWED, start + dt.timedelta(hours=i),
                     actor=f"dr{i}@ortho.example", ip="198.51.100.7", detail={"n": i})
    return [e.id for e in AuditEvent.select().order_by(AuditEvent.seq)]


def sql(runtime, statement: str, *params) -> None:
    runtime.db.execute_sql(statement.replace("?", runtime.db.param), params)


def shift(runtime, by: int, from_seq: int) -> None:
    """Move events' places, through negatives so the unique index never sees a clash."""
    sql(runtime, "UPDATE audit_event SET seq = -seq WHERE seq >= ?", from_seq)
    sql(runtime, "UPDATE audit_event SET seq = -seq + ? WHERE seq < 0", by)


def test_an_intact_trail_verifies_and_counts_since(runtime):
    trail(runtime, 10)
    verdict = audit.verify(runtime.audit_key)
    assert verdict.ok and verdict.checked == 10
    assert audit.verify(runtime.audit_key, since=START + dt.timedelta(hours=7)).checked == 3
    assert audit.head()[0] == 10


def test_bulk_appends_link_into_the_same_chain(runtime):
    trail(runtime, 3)
    audit.record_many(runtime.audit_key, [
        dict(kind=Audit.GRANT_EXPIRED, at=START, actor="expiry", detail={"i": i})
        for i in range(2500)])
    trail(runtime, 2)
    verdict = audit.verify(runtime.audit_key)
    assert verdict.ok and verdict.checked == 2505


def test_an_edited_event_is_named(runtime):
    ids = trail(runtime)
    sql(runtime, "UPDATE audit_event SET actor = ? WHERE id = ?", "someone.else@x.example", ids[4])
    verdict = audit.verify(runtime.audit_key)
    assert not verdict.ok
    assert (verdict.event_id, verdict.checked) == (ids[4], 4)
    assert verdict.problem.startswith("content changed")


def test_a_backdated_event_is_named(runtime):
    ids = trail(runtime)
    sql(runtime, "UPDATE audit_event SET at = ? WHERE id = ?", START - dt.timedelta(days=3),
        ids[2])
    verdict = audit.verify(runtime.audit_key)
    assert (verdict.ok, verdict.event_id) == (False, ids[2])


def test_a_deleted_event_is_named(runtime):
    ids = trail(runtime)
    sql(runtime, "DELETE FROM audit_event WHERE id = ?", ids[6])
    verdict = audit.verify(runtime.audit_key)
    assert (verdict.ok, verdict.event_id) == (False, ids[7])
    assert "missing" in verdict.problem and "7 to 7" in verdict.problem


def test_a_deleted_event_with_the_places_closed_up_is_caught(runtime):
    ids = trail(runtime)
    sql(runtime, "DELETE FROM audit_event WHERE id = ?", ids[6])
    shift(runtime, -1, from_seq=8)
    sql(runtime, "UPDATE audit_head SET seq = seq - 1")
    verdict = audit.verify(runtime.audit_key)
    assert (verdict.ok, verdict.event_id) == (False, ids[7])
    assert verdict.problem.startswith("content changed")


def test_swapped_events_are_caught(runtime):
    ids = trail(runtime)
    sql(runtime, "UPDATE audit_event SET seq = -1 WHERE id = ?", ids[3])
    sql(runtime, "UPDATE audit_event SET seq = 4 WHERE id = ?", ids[4])
    sql(runtime, "UPDATE audit_event SET seq = 5 WHERE id = ?", ids[3])
    verdict = audit.verify(runtime.audit_key)
    assert (verdict.ok, verdict.event_id) == (False, ids[4])
    assert verdict.problem.startswith("out of order")


def test_an_inserted_event_is_caught(runtime):
    ids = trail(runtime)
    real = AuditEvent.get_by_id(ids[5])
    shift(runtime, 1, from_seq=6)
    AuditEvent.create(seq=6, mac=real.mac, at=real.at, kind=Audit.DOCUMENT_DOWNLOADED,
                      actor="forger@x.example", detail={})
    verdict = audit.verify(runtime.audit_key)
    assert not verdict.ok and verdict.checked == 5


def test_a_cut_tail_is_caught(runtime):
    ids = trail(runtime)
    sql(runtime, "DELETE FROM audit_event WHERE id >= ?", ids[8])
    verdict = audit.verify(runtime.audit_key)
    assert not verdict.ok and "9 to 10" in verdict.problem and verdict.checked == 8


def test_a_tampered_head_is_caught(runtime):
    trail(runtime)
    sql(runtime, "UPDATE audit_head SET mac = ?", "0" * 64)
    verdict = audit.verify(runtime.audit_key)
    assert not verdict.ok and "head" in verdict.problem


def test_anchoring_to_an_exported_head_catches_a_cut_and_rewound_tail(runtime):
    """Cutting the tail and rewinding the head to match leaves a consistent, shorter chain:
    only a head kept outside the database (the last line of every export) shows it."""
    trail(runtime)
    exported = audit.head()
    sql(runtime, "DELETE FROM audit_event WHERE seq > 8")
    earlier = AuditEvent.get(AuditEvent.seq == 8)
    sql(runtime, "UPDATE audit_head SET seq = 8, mac = ?", earlier.mac)
    assert audit.verify(runtime.audit_key).ok
    verdict = audit.verify(runtime.audit_key, anchor=exported)
    assert not verdict.ok and "exported head" in verdict.problem and "10" in verdict.problem


def test_an_anchor_that_was_rewritten_is_caught(runtime):
    trail(runtime)
    seq, _ = audit.head()
    verdict = audit.verify(runtime.audit_key, anchor=(seq, "f" * 64))
    assert not verdict.ok and "exported head" in verdict.problem


def test_a_wrong_key_fails_the_first_event(runtime):
    ids = trail(runtime, 3)
    verdict = audit.verify(b"k" * 32)
    assert (verdict.ok, verdict.event_id, verdict.checked) == (False, ids[0], 0)


def test_pruning_leaves_a_checkpoint_verify_starts_from(runtime):
    trail(runtime, 10)
    pruned = audit.prune(runtime.audit_key, before=START + dt.timedelta(hours=4),
                         now=START + dt.timedelta(days=400))
    assert pruned == 4 and AuditEvent.select().count() == 6
    verdict = audit.verify(runtime.audit_key)
    assert verdict.ok and verdict.checked == 6
    trail(runtime, 2, start=START + dt.timedelta(hours=10))  # the chain goes on
    assert audit.prune(runtime.audit_key, before=START + dt.timedelta(hours=6),
                       now=START + dt.timedelta(days=401)) == 2
    assert AuditCheckpoint.select().order_by(AuditCheckpoint.seq.desc()).first().pruned == 6
    verdict = audit.verify(runtime.audit_key)
    assert verdict.ok and verdict.checked == 6


def test_a_forged_checkpoint_hiding_deleted_events_is_caught(runtime):
    trail(runtime, 10)
    boundary = AuditEvent.get(AuditEvent.seq == 5)
    sql(runtime, "DELETE FROM audit_event WHERE seq <= 5")
    AuditCheckpoint.create(seq=5, mac=boundary.mac, at=START, pruned=5, signature="0" * 64)
    verdict = audit.verify(runtime.audit_key)
    assert not verdict.ok and "not genuine" in verdict.problem


def test_deleting_the_oldest_events_without_a_checkpoint_is_caught(runtime):
    ids = trail(runtime, 10)
    sql(runtime, "DELETE FROM audit_event WHERE seq <= 3")
    verdict = audit.verify(runtime.audit_key)
    assert (verdict.ok, verdict.event_id) == (False, ids[3])
    assert "1 to 3" in verdict.problem


def test_concurrent_writers_form_one_chain(runtime):
    """Writers on separate connections (as on separate processes or nodes) take turns at
    the head: no two events share a place and the chain verifies."""
    if runtime.db.__class__.__name__.startswith("Sqlite"):
        pytest.skip("SQLite serialises writers itself; the head lock matters on PostgreSQL")
    AuditHead.get_or_create(id=1, defaults={"seq": 0, "mac": ""})
    errors = []

    def write(n: int) -> None:
        try:
            for i in range(25):
                with runtime.db.atomic():
                    audit.record(runtime.audit_key, Audit.DOCUMENT_VIEWED, START,
                                 detail={"writer": n, "i": i})
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            runtime.db.close()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    verdict = audit.verify(runtime.audit_key)
    assert verdict.ok and verdict.checked == 100


def test_events_keep_naming_a_row_that_was_deleted_and_still_verify(runtime):
    """A ledger outlives what it names: deleting a row an event refers to leaves the event
    as written (no constraint nulls its reference, which would break its MAC)."""
    clinic = Clinic.create(name="Closed Clinic", created_at=START)
    audit.record(runtime.audit_key, Audit.CLINIC_CHANGED, START, clinic=clinic,
                 actor="ops@clinic.example")
    sql(runtime, 'DELETE FROM "clinic" WHERE id = ?', clinic.id)
    event = AuditEvent.get()
    assert event.clinic_id == clinic.id
    assert audit.verify(runtime.audit_key).ok


def test_upgraded_postgresql_databases_lose_the_old_constraints(runtime):
    if not isinstance(runtime.db, peewee.PostgresqlDatabase):
        pytest.skip("SQLite keeps an upgraded database's inert constraints (docs/decisions.md)")
    sql(runtime, 'ALTER TABLE "audit_event" ADD CONSTRAINT old_share FOREIGN KEY (share_id) '
                 'REFERENCES "share" (id) ON DELETE SET NULL')
    schema._v15_audit_references(runtime.db, None)
    left = runtime.db.execute_sql("SELECT count(*) FROM pg_constraint WHERE contype = 'f' "
                                  "AND conrelid = 'audit_event'::regclass").fetchone()[0]
    assert left == 0
