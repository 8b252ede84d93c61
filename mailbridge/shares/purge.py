"""The purge job: what is kept only for a while — raw spooled messages of finished rows,
ended portal sessions, spent codes and reset links, files no row references — and what the
retention policies let go (documents past their clinic's retention, old audit events)."""

from __future__ import annotations

import datetime as dt
import logging

import peewee

from mailbridge.runtime import Runtime
from mailbridge.shares import access_requests, orphans, retention
from mailbridge.shares.jobs import Stop, stopped
from mailbridge.store.blobs import StorageError
from mailbridge.store.models import InboundMessage, OneTimeCode, PasswordReset, WebSession
from mailbridge.store.states import FINISHED

log = logging.getLogger(__name__)

DELETE_BATCH = 20_000  # rows per DELETE statement and transaction


def purge(runtime: Runtime, batch: int = 500, stop: Stop = None,
          delete_batch: int = DELETE_BATCH) -> int:
    """Delete what is kept only for a while: raw spooled messages of finished rows (`[retention]
    spool_days`; the shares keep their documents), ended portal sessions (`session_days`),
    spent codes and reset links (`code_days`), and files no row references (left by a crash)
    once `orphan_hours` old; documents of shares past their clinic's retention (crypto-
    shredded; the share and its audit trail stay) and audit events past
    `audit_retention_days` (behind a signed checkpoint)."""
    now = runtime.clock()
    keep = runtime.settings.retention
    raw = _purge_spool(runtime, now - dt.timedelta(days=keep.spool_days), now, batch, stop)
    session_cutoff = now - dt.timedelta(days=keep.session_days)
    # A session never signed out ends at its absolute timeout.
    lifetime = dt.timedelta(hours=runtime.settings.web.session_absolute_hours)
    code_cutoff = now - dt.timedelta(days=keep.code_days)
    sessions = _delete(runtime, WebSession.id_hash,
                       (WebSession.ended_at < session_cutoff)
                       | (WebSession.ended_at.is_null()
                          & (WebSession.created_at < session_cutoff - lifetime)),
                       delete_batch, stop)
    codes = _delete(runtime, OneTimeCode.id, (OneTimeCode.used_at < code_cutoff)
                    | (OneTimeCode.expires_at < code_cutoff), delete_batch, stop)
    resets = _delete(runtime, PasswordReset.id, (PasswordReset.used_at < code_cutoff)
                     | (PasswordReset.expires_at < code_cutoff), delete_batch, stop)
    # Requests for access whose code was never entered (few: 3 per link in 15 minutes).
    codes += access_requests.purge_unverified(code_cutoff)
    orphaned = 0 if stopped(stop) else orphans.sweep(runtime, stop=stop)
    shredded = 0 if stopped(stop) else retention.shred_expired(runtime, stop=stop)
    pruned = 0 if stopped(stop) else retention.prune_audit(runtime)
    total = raw + sessions + codes + resets + orphaned + shredded + pruned
    if total:
        log.info("purge: %d raw message(s), %d session(s), %d code(s), %d reset link(s), "
                 "%d orphaned file(s), %d share(s) past retention, %d audit event(s)",
                 raw, sessions, codes, resets, orphaned, shredded, pruned)
    return total


def _delete(runtime: Runtime, key: peewee.Field, where: peewee.Expression, batch: int,
            stop: Stop) -> int:
    """DELETE the rows `where` holds for, `batch` per statement and transaction: a backlog of
    a million rows never holds the database for long. Re-checked in the DELETE itself, so
    rows two nodes both picked go once."""
    model = key.model
    deleted = 0
    while True:
        with runtime.db.atomic():
            chosen = model.select(key).where(where).limit(batch)
            done = model.delete().where(key.in_(chosen) & where).execute()
        deleted += done
        if done < batch or stopped(stop):
            return deleted


def _purge_spool(runtime: Runtime, cutoff: dt.datetime, now: dt.datetime, batch: int,
                 stop: Stop = None) -> int:
    """The raw bytes go first, one file at a time (a crash leaves the row for next time); the
    rows whose file is gone are then marked in one UPDATE per batch."""
    purged, last_id = 0, 0
    while True:
        rows = list(InboundMessage.select(InboundMessage.id, InboundMessage.blob_id)
                    .where(InboundMessage.state.in_(FINISHED)
                           & InboundMessage.purged_at.is_null()
                           & (InboundMessage.received_at < cutoff) & (InboundMessage.id > last_id))
                    .order_by(InboundMessage.id).limit(batch))
        gone = []
        for row in rows:
            try:
                runtime.spool.delete(row.blob_id)
            except StorageError:
                log.warning("purge: could not delete the raw message of inbound #%d", row.id)
                continue
            gone.append(row.id)
        if gone:
            with runtime.db.atomic():
                purged += (InboundMessage.update(purged_at=now)
                           .where(InboundMessage.id.in_(gone)
                                  & InboundMessage.purged_at.is_null()).execute())
        if len(rows) < batch or stopped(stop):
            return purged
        last_id = rows[-1].id
