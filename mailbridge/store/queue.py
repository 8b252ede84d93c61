"""The one leased queue behind the intake spool and the outbox: rows in a waiting state are
claimed with `FOR UPDATE SKIP LOCKED` on PostgreSQL (claimers pass each other by instead of
queueing on the same rows) and a conditional UPDATE on SQLite — either way two workers or
nodes never take the same row. A claimed row is held
under a lease that a heartbeat renews while the work is in hand, handed back on a stop, and
recovered by their own node at start. A crashed node's rows are taken over when their lease
runs out."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import peewee

from mailbridge.store.db import UNAVAILABLE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Queue:
    """A table used as a queue: `waiting` rows are due at `next_attempt_at`; a claimed row is
    `working`, with `claimed_by` and `lease_until`; `attempts` counts claims."""

    model: type[peewee.Model]
    waiting: str
    working: str

    def claimable(self, now: dt.datetime):
        m = self.model
        due = (m.state == self.waiting) & (m.next_attempt_at <= now)
        lapsed = (m.state == self.working) & (m.lease_until < now)
        return due | lapsed

    def held_by(self, node: str):
        return (self.model.state == self.working) & (self.model.claimed_by == node)


def claim(db: peewee.Database, queue: Queue, *, now: dt.datetime, lease_seconds: float,
          node: str, limit: int, scan: int | None = None) -> list[int]:
    """Lease up to `limit` due rows (oldest first) to `node`; returns their ids. Claiming
    counts as an attempt, so work that crashes its worker still runs out of attempts."""
    m = queue.model
    if isinstance(db, peewee.PostgresqlDatabase):
        return _claim_skip_locked(db, queue, now=now, lease_seconds=lease_seconds, node=node,
                                  limit=limit)
    # Read the candidates completely first: on SQLite an open read cursor would make the
    # write transaction below fail at once instead of waiting for the lock.
    candidates = [row.id for row in m.select(m.id).where(queue.claimable(now))
                  .order_by(m.next_attempt_at, m.id).limit(scan or limit)]
    claimed: list[int] = []
    with db.atomic():
        for candidate in candidates:
            taken = (m.update(state=queue.working, claimed_by=node, attempts=m.attempts + 1,
                              lease_until=now + dt.timedelta(seconds=lease_seconds))
                     .where((m.id == candidate) & queue.claimable(now)).execute())
            if taken:
                claimed.append(candidate)
                if len(claimed) >= limit:
                    break
    return claimed


def _claim_skip_locked(db: peewee.Database, queue: Queue, *, now: dt.datetime,
                       lease_seconds: float, node: str, limit: int) -> list[int]:
    """One statement: the oldest due rows that no other transaction has locked are locked
    and leased. A row another claimer is taking is skipped, not waited for; a row taken and
    committed meanwhile is seen in its new state and no longer matches."""
    m = queue.model
    due = (m.select(m.id).where(queue.claimable(now)).order_by(m.next_attempt_at, m.id)
           .limit(limit).for_update(skip_locked=True))
    with db.atomic():
        rows = (m.update(state=queue.working, claimed_by=node, attempts=m.attempts + 1,
                         lease_until=now + dt.timedelta(seconds=lease_seconds))
                .where(m.id.in_(due)).returning(m.id).execute())
        return sorted(row.id for row in rows)


def uncounted(model: type[peewee.Model]):
    """`attempts - 1`: undoes the count that claiming added."""
    return peewee.Case(None, [(model.attempts > 0, model.attempts - 1)], 0)


def release(queue: Queue, ids: Iterable[int], node: str, **values) -> int:
    """Hand claimed rows back, due at once and the claim not counted — unless another node
    has taken one over since. Runs in the caller's transaction."""
    m = queue.model
    return (m.update(state=queue.waiting, lease_until=None, claimed_by="",
                     attempts=uncounted(m), **values)
            .where(m.id.in_(list(ids)) & queue.held_by(node)).execute())


def recover(db: peewee.Database, queue: Queue, node: str, now: dt.datetime) -> int:
    """At start: rows this node held when it last stopped are due again now (the interrupted
    attempt still counts). Other nodes' rows wait for their lease."""
    with db.atomic():
        return (queue.model.update(state=queue.waiting, lease_until=None, claimed_by="",
                                   next_attempt_at=now)
                .where(queue.held_by(node)).execute())


def renew(queue: Queue, ids: list[int], node: str, until: dt.datetime) -> int:
    m = queue.model
    return m.update(lease_until=until).where(m.id.in_(ids) & queue.held_by(node)).execute()


@contextlib.contextmanager
def kept(db: peewee.Database, clock: Callable[[], dt.datetime], lease_seconds: float,
         queue: Queue, ids: Iterable[int], node: str) -> Iterator[None]:
    """Renew the lease of `ids` every third of `lease_seconds` until the block ends, so the
    lease can be short (a crashed node's work is taken over within about one lease) while
    slow work in hand is never taken over. Renewal runs in its own thread, with its own
    database connection when it needs one."""
    done = threading.Event()
    thread = threading.Thread(target=_renew, name="lease-heartbeat", daemon=True,
                              args=(db, clock, lease_seconds, queue, list(ids), node, done))
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(1.0)  # a renewal stuck on a dead database must not hold the caller


def _renew(db: peewee.Database, clock: Callable[[], dt.datetime], lease_seconds: float,
           queue: Queue, ids: list[int], node: str, done: threading.Event) -> None:
    try:
        while not done.wait(lease_seconds / 3):
            try:
                renew(queue, ids, node, clock() + dt.timedelta(seconds=lease_seconds))
            except UNAVAILABLE as exc:  # the holder meets the same outage and says so
                log.debug("lease renewal failed (%s)", type(exc).__name__)
    finally:
        db.close()  # this thread's connection, if it opened one
