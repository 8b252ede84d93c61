"""Group commit for the portal's audit events: requests that record an event at the same
moment (four downloads at once) have them written in one transaction instead of queueing for
the database's single writer one by one. Each request still returns only once its own event
is committed, so every view and download stays audited before a byte is sent."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import peewee

from mailbridge.store import audit


@dataclass
class _Ticket:
    event: dict
    done: bool = False
    error: BaseException | None = None


class AuditBatcher:
    """One per portal process. The first request to arrive writes every event queued by then
    (its own included) while later ones wait for it; a follower whose event was in that batch
    finds it committed and goes on."""

    def __init__(self, db: peewee.Database, key: bytes) -> None:
        self._db, self._key = db, key
        self._queue_lock = threading.Lock()
        self._writer = threading.Lock()
        self._pending: list[_Ticket] = []

    def record(self, event: dict) -> None:
        """`event` holds `audit.record`'s arguments. Inside an open transaction the event is
        part of it, as before."""
        if self._db.in_transaction():
            with self._db.atomic():
                audit.record_many(self._key, [event])
            return
        ticket = _Ticket(event)
        with self._queue_lock:
            self._pending.append(ticket)
        with self._writer:
            if not ticket.done:
                with self._queue_lock:
                    batch, self._pending = self._pending, []
                self._write(batch)
        if ticket.error is not None:
            raise ticket.error

    def _write(self, batch: list[_Ticket]) -> None:
        try:
            try:
                with self._db.atomic():
                    audit.record_many(self._key, [t.event for t in batch])
                for ticket in batch:
                    ticket.done = True
            except Exception:
                # One bad event must not fail its neighbours' requests: each on its own.
                for ticket in batch:
                    try:
                        with self._db.atomic():
                            audit.record_many(self._key, [ticket.event])
                    except Exception as exc:  # noqa: BLE001 - raised in that request
                        ticket.error = exc
                    ticket.done = True
        finally:
            for ticket in batch:  # interrupted (BaseException): nobody may think it written
                if not ticket.done:
                    ticket.error = RuntimeError("audit event not written")
                    ticket.done = True
