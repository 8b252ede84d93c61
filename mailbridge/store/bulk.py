"""Set-based statements for the jobs: pick up to `limit` rows and change them in one
`UPDATE … RETURNING` (PostgreSQL; SQLite 3.35 and later), the state guard in the WHERE clause,
so a second run or a second node finds those rows done and changes nothing."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import peewee
from peewee import fn

from mailbridge.store.models import Grant, Share
from mailbridge.store.states import GrantState

# SQLite's page cache for a bulk job's connection (KiB): a batch's index pages stay in it
# instead of being read back from the OS for every row (the default is 2 MiB).
SQLITE_JOB_CACHE_KIB = 65536


def roomy_cache(db: peewee.Database) -> None:
    """Give this thread's SQLite connection a page cache that holds a batch's index pages;
    it lasts as long as the connection (the scheduler closes it after each run)."""
    if isinstance(db, peewee.SqliteDatabase):
        db.execute_sql(f"PRAGMA cache_size = -{SQLITE_JOB_CACHE_KIB}")


def _among(db: peewee.Database, chosen: peewee.Select) -> peewee.Expression:
    """`grant.id` among the rows `chosen` picks. On PostgreSQL the pick is evaluated once
    into an array (`= ANY(ARRAY(...))`), so each row is then found by its key rather than by
    a join over the whole table; and a node skips rows another node is changing right now
    (SKIP LOCKED) instead of waiting for them, which its guard would find done anyway."""
    if db.for_update:
        return Grant.id == fn.ANY(fn.ARRAY(chosen.for_update(skip_locked=True)))
    return Grant.id.in_(chosen)


def _rows(db: peewee.Database, query) -> list[tuple]:
    # The driver's tuples as they are: peewee's row conversion costs more than the update.
    return db.execute(query).fetchall()


def expire_due(db: peewee.Database, now: dt.datetime, limit: int) -> list[tuple[int, int]]:
    """Pending grants past their deadline become expired, up to `limit` of them; returns
    (share id, grant id) of each, in grant id order."""
    due = ((Grant.state == GrantState.PENDING) & (Grant.deadline <= now))
    # No ORDER BY: the partial index hands out due rows without sorting them all per batch.
    chosen = Grant.select(Grant.id).where(due).limit(limit)
    changed = _rows(db, Grant.update(state=GrantState.EXPIRED, ended_at=now)
                    .where(_among(db, chosen) & due).returning(Grant.share, Grant.id))
    changed.sort(key=lambda row: row[1])
    return changed


def mark_reminded(db: peewee.Database, grant_ids: Sequence[int],
                  now: dt.datetime) -> set[int]:
    """Mark the grants' one reminder as sent, those still pending, not reminded and before
    their deadline; returns the ids marked (the others were claimed, reminded or ended
    meanwhile, perhaps by another node)."""
    if not grant_ids:
        return set()
    return {grant_id for (grant_id,) in
            Grant.update(reminded_at=now)
            .where(Grant.id.in_(list(grant_ids)) & Grant.reminded_at.is_null()
                   & (Grant.state == GrantState.PENDING) & (Grant.deadline > now))
            .returning(Grant.id).tuples().execute()}


def mark_expiry_reported(db: peewee.Database, share_ids: Sequence[int],
                         now: dt.datetime) -> dict[int, list[str]]:
    """Mark the expired, not yet reported grants of these shares as reported; returns for
    each share the addresses marked, in grant id order."""
    if not share_ids:
        return {}
    marked = (Grant.update(expiry_reported_at=now)
              .where(Grant.share.in_(list(share_ids)) & Grant.expiry_reported_at.is_null()
                     & (Grant.state == GrantState.EXPIRED))
              .returning(Grant.share, Grant.id, Grant.address).tuples().execute())
    by_share: dict[int, list[tuple[int, str]]] = {}
    for share_id, grant_id, address in marked:
        by_share.setdefault(share_id, []).append((grant_id, address))
    return {share_id: [address for _, address in sorted(rows)]
            for share_id, rows in by_share.items()}


def lock_shares(db: peewee.Database, share_ids: Sequence[int]) -> None:
    """On PostgreSQL, lock the shares' rows in id order for the caller's transaction (SQLite's
    write transactions hold the whole database already)."""
    if db.for_update and share_ids:
        list(Share.select(Share.id).where(Share.id.in_(list(share_ids)))
             .order_by(Share.id).for_update())
