"""Ending a spooled message's row: its final state, recorded in the transaction of whatever
the message made, and dropping its raw bytes when nothing of it is needed."""

from __future__ import annotations

import datetime as dt
import logging

import peewee

from mailbridge.store.blobs import BlobStore, StorageError
from mailbridge.store.models import InboundMessage

log = logging.getLogger(__name__)


def conclude(row: InboundMessage, state: str, outcome: str, reason: str,
             now: dt.datetime) -> None:
    """Record a final state, inside the caller's transaction (with whatever the message made)."""
    (InboundMessage.update(state=state, outcome=outcome, reason=reason[:2000], finished_at=now,
                           lease_until=None)
     .where(InboundMessage.id == row.id).execute())


def discard_raw(db: peewee.Database, blobs: BlobStore, row: InboundMessage,
                now: dt.datetime) -> None:
    """Delete the raw message of a row that ended ignored (unauthenticated, automated, a
    repeat): nothing of it is needed, and keeping it would let anyone fill the disk by
    sending mail in a member's name. The row and its reason stay. A failure here is left to
    the purge job."""
    try:
        blobs.delete(row.blob_id)
    except StorageError:
        log.warning("inbound #%d: could not delete the raw message now; purge will", row.id)
        return
    with db.atomic():
        (InboundMessage.update(purged_at=now)
         .where((InboundMessage.id == row.id) & InboundMessage.purged_at.is_null()).execute())
