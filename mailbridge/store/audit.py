"""The audit trail: every state change and every view or download becomes one event, and the
events form a chain that shows tampering (HIPAA 164.312(b), (c)). Each event's MAC
(HMAC-SHA256, a key derived from the master key) covers its own content and the MAC of the
event before it, so an edited, deleted, inserted or reordered event breaks the chain at that
point. Appending locks the one chain-head row in the writer's transaction: writers on any
number of processes and nodes take turns, and every event gets the next place."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from mailbridge.store import audit_rows
from mailbridge.store.models import AuditCheckpoint, AuditEvent, AuditHead

REFS = audit_rows.REFS
BATCH = 5000  # events read per page


def record(key: bytes, kind: str, at: dt.datetime, *, actor: str = "",
           detail: dict | None = None, **refs) -> None:
    """Append one event, inside the caller's transaction. `refs` are model foreign keys
    (share=, grant=, document=, member=, account=, inbound=, clinic=) and ip=, user_agent=."""
    record_many(key, [dict(kind=kind, at=at, actor=actor, detail=detail or {}, **refs)])


def record_many(key: bytes, events: Iterable[dict]) -> int:
    """Append several events in order; each dict holds `record`'s arguments. Runs in the
    caller's transaction; returns how many were appended. Many events of one kind at one
    time: `record_each` is faster."""
    db = AuditEvent._meta.database
    with db.atomic():
        seq, mac = _locked_head(db)
        keyed = hmac.new(key, digestmod=hashlib.sha256)
        rows = []
        for values in events:
            row = _row(values)
            seq += 1
            row["seq"] = seq
            h = keyed.copy()
            h.update(mac.encode() + b"\0" + canonical(row))
            row["mac"] = mac = h.hexdigest()
            rows.append(_columns(row))
        if rows:
            audit_rows.insert(db, audit_rows.COLUMNS, rows)
            _move_head(db, seq, mac)
    return len(rows)


def record_each(key: bytes, template: audit_rows.Template, events: Sequence[tuple]) -> int:
    """Append one event per item of `events` (the refs `template` varies, in its order), in
    order, inside the caller's transaction: the set-based jobs' path, a template's constant
    parts encoded once. Returns how many were appended."""
    db = AuditEvent._meta.database
    if not events:
        return 0
    with db.atomic():
        seq, mac = _locked_head(db)
        rows, seq, mac = audit_rows.chain(key, mac, seq, template, events)
        audit_rows.insert(db, template.columns, rows, template.constants)
        _move_head(db, seq, mac)
    return len(rows)


def link(key: bytes, previous_mac: str, row: dict) -> str:
    """The MAC of an event (its stored fields as a dict) following `previous_mac`."""
    return hmac.new(key, previous_mac.encode() + b"\0" + canonical(row),
                    hashlib.sha256).hexdigest()


canonical = audit_rows.canonical  # what an event's MAC covers


def _columns(row: dict) -> tuple:
    return (row["seq"], row["mac"], row["at"], row["kind"], row["actor"],
            *(row[ref] for ref in REFS), row["ip"], row["user_agent"],
            audit_rows.stored_json(row["detail"]))


def _id(value) -> int | None:
    if value is None:
        return None
    return int(getattr(value, "id", value))


def _row(values: dict) -> dict:
    row = {"kind": str(values["kind"]), "at": values["at"], "actor": values.get("actor") or "",
           "detail": values.get("detail") or {}, "ip": values.get("ip") or "",
           "user_agent": values.get("user_agent") or ""}
    for ref in REFS:
        row[ref] = _id(values.get(ref))
    unknown = set(values) - set(row)
    if unknown:
        raise TypeError(f"unknown audit fields: {sorted(unknown)}")
    return row


def _locked_head(db) -> tuple[int, str]:
    """The chain head's (seq, mac). In plain SQL: every audited request runs this. PostgreSQL
    locks the row until the transaction ends; SQLite's write transactions (IMMEDIATE) already
    hold the whole database."""
    lock = " FOR UPDATE" if db.for_update else ""
    row = db.execute_sql(f'SELECT "seq", "mac" FROM "audit_head" WHERE "id" = 1{lock}'  # noqa: S608 - no values
                         ).fetchone()
    if row is None:  # the first event ever (the migration creates the row as well)
        AuditHead.create(id=1, seq=0, mac="")
        return 0, ""
    return int(row[0]), row[1]


def _move_head(db, seq: int, mac: str) -> None:
    db.execute_sql(f'UPDATE "audit_head" SET "seq" = {db.param}, "mac" = {db.param} '  # noqa: S608 - placeholders
                   'WHERE "id" = 1', (seq, mac))


def stored(event: AuditEvent) -> dict:
    """An event read back, in the form its MAC was computed over."""
    row = {"seq": event.seq, "at": event.at, "kind": event.kind, "actor": event.actor,
           "ip": event.ip, "user_agent": event.user_agent, "detail": event.detail}
    for ref in REFS:
        row[ref] = getattr(event, f"{ref}_id")
    return row


# --- reading the chain ---------------------------------------------------------------------


def walk(since_seq: int = 0) -> Iterator[AuditEvent]:
    """Events in chain order from `since_seq` on, a page at a time (constant memory on any
    database)."""
    last = since_seq - 1
    while True:
        page = list(AuditEvent.select().where(AuditEvent.seq > last)
                    .order_by(AuditEvent.seq).limit(BATCH))
        yield from page
        if len(page) < BATCH:
            return
        last = page[-1].seq


@dataclass(frozen=True)
class Verdict:
    ok: bool
    checked: int
    event_id: int | None = None  # the first bad event
    problem: str = ""


def sign_checkpoint(key: bytes, seq: int, mac: str) -> str:
    return hmac.new(key, f"checkpoint\0{seq}\0{mac}".encode(), hashlib.sha256).hexdigest()


def verify(key: bytes, since: dt.datetime | None = None,
           anchor: tuple[int, str] | None = None) -> Verdict:
    """Walk the chain (from the latest pruning checkpoint) and recompute every MAC. With
    `since`, events before it are still linked but not counted. `anchor` is a head kept
    outside the database (the last line of an export): the chain must still hold that event
    with that MAC, which is what shows a tail cut off with the head rewound to match."""
    checkpoint = AuditCheckpoint.select().order_by(AuditCheckpoint.seq.desc()).first()
    expected_seq, previous_mac, previous_id = 1, "", 0
    if checkpoint is not None:
        if not hmac.compare_digest(checkpoint.signature,
                                   sign_checkpoint(key, checkpoint.seq, checkpoint.mac)):
            return Verdict(False, 0, None, f"the pruning checkpoint at event {checkpoint.seq} "
                           "is not genuine")
        expected_seq, previous_mac = checkpoint.seq + 1, checkpoint.mac
    # An anchor already pruned behind the checkpoint can no longer be compared.
    anchored = anchor is None or anchor[0] < expected_seq - 1 or anchor == (expected_seq - 1,
                                                                            previous_mac)
    checked = 0
    states, memo = audit_rows.keyed_states(key), {}
    for row in audit_rows.stored_rows(AuditEvent._meta.database, expected_seq):
        event_id, seq, mac = row[0], row[1], row[2] or ""
        if seq != expected_seq:
            return Verdict(False, checked, event_id,
                           f"missing: the event(s) before it (chain places {expected_seq} to "
                           f"{seq - 1}) are gone")
        if event_id < previous_id:
            return Verdict(False, checked, event_id,
                           "out of order: it was moved before an event written earlier")
        read = audit_rows.stored_canonical(row, memo)
        if read is None or not hmac.compare_digest(
                mac, audit_rows.mac_of(states, previous_mac, read[1])):
            return Verdict(False, checked, event_id, _why_not(seq, event_id))
        if since is None or read[0] >= since:
            checked += 1
        expected_seq, previous_mac, previous_id = seq + 1, mac, event_id
        if anchor is not None and seq == anchor[0]:
            anchored = hmac.compare_digest(mac, anchor[1])
    if not anchored:
        return Verdict(False, checked, None,
                       f"the exported head (event {anchor[0]}) is not in the chain: the chain "
                       f"ends at {expected_seq - 1} or was rewritten")
    head = AuditHead.get_or_none(AuditHead.id == 1)
    if head is not None and head.seq >= expected_seq:
        return Verdict(False, checked, None,
                       f"missing: the last event(s) (chain places {expected_seq} to "
                       f"{head.seq}) are gone")
    if head is not None and head.seq == expected_seq - 1 and head.mac != previous_mac:
        return Verdict(False, checked, None, "the chain's head does not match its last event")
    return Verdict(True, checked)


def _why_not(seq: int, event_id: int) -> str:
    """An event's MAC covers its place, so a moved event fails like an edited one; an event
    written earlier now following it tells the two apart."""
    moved = (AuditEvent.select().where((AuditEvent.seq > seq)
                                       & (AuditEvent.id < event_id)).exists())
    if moved:
        return "out of order: it sits before events written earlier (moved or inserted)"
    return "content changed: it is not what was written"


def prune(key: bytes, before: dt.datetime, now: dt.datetime) -> int:
    """Delete the oldest events, those before `before`, behind a signed checkpoint holding
    the last pruned event's place and MAC, so `verify` still walks an unbroken chain from
    there. Returns how many were deleted."""
    db = AuditEvent._meta.database
    with db.atomic():
        boundary = (AuditEvent.select(AuditEvent.seq, AuditEvent.mac)
                    .where(AuditEvent.at < before).order_by(AuditEvent.seq.desc()).first())
        if boundary is None:
            return 0
        pruned = (AuditEvent.delete().where(AuditEvent.seq <= boundary.seq).execute())
        earlier = (AuditCheckpoint.select(AuditCheckpoint.pruned)
                   .order_by(AuditCheckpoint.seq.desc()).first())
        AuditCheckpoint.create(seq=boundary.seq, mac=boundary.mac, at=now,
                               pruned=pruned + (earlier.pruned if earlier else 0),
                               signature=sign_checkpoint(key, boundary.seq, boundary.mac))
    return pruned


def head() -> tuple[int, str]:
    row = AuditHead.get_or_none(AuditHead.id == 1)
    return (row.seq, row.mac) if row is not None else (0, "")
