"""The durable intake queue. A message is encrypted to disk and its row committed before we
answer 250; workers claim rows with a lease, so a crash leaves them to be processed again."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging

import peewee

from mailbridge import phi
from mailbridge.models import InboundMessage
from mailbridge.runtime import Runtime
from mailbridge.storage import StorageError, put_bytes, read_all

log = logging.getLogger(__name__)

FINAL_STATES = ("done", "ignored", "rejected", "failed")


def enqueue(runtime: Runtime, raw: bytes, *, channel: str, envelope_from: str,
            envelope_to: list[str], source_key: str | None = None,
            unreadable: str = "", client_ip: str = "", protocol: str = "") -> InboundMessage:
    """Store and commit; raises storage.StorageFull/StorageError or a database error, in
    which case nothing was accepted. `unreadable` (a reason) records a message that cannot be
    processed at all straight as `failed`, so the operator sees it in `spool list`."""
    blob = put_bytes(runtime.spool, raw)
    now = runtime.clock()
    final = {"state": "failed", "outcome": "unreadable", "reason": unreadable,
             "finished_at": now} if unreadable else {"state": "queued"}
    try:
        with runtime.db.atomic():
            row = InboundMessage.create(
                received_at=now, channel=channel, envelope_from=envelope_from,
                envelope_to=list(envelope_to), client_ip=client_ip, protocol=protocol,
                size=len(raw), blob_id=blob.blob_id,
                blob_key=blob.wrapped_key, raw_sha256=hashlib.sha256(raw).hexdigest(),
                source_key=source_key, next_attempt_at=now, **final)
    except BaseException:
        runtime.spool.delete(blob.blob_id)
        raise
    if not unreadable:
        runtime.wake_worker.set()
    return row


def read_raw(runtime: Runtime, row: InboundMessage) -> bytes:
    return read_all(runtime.spool, row.blob_id, bytes(row.blob_key))


def claim_next(runtime: Runtime, node: str) -> InboundMessage | None:
    """Take the oldest due row (or one whose lease ran out); safe with several workers/nodes."""
    now = runtime.clock()
    lease = now + dt.timedelta(seconds=runtime.settings.worker.lease_seconds)
    due = ((InboundMessage.state == "queued") & (InboundMessage.next_attempt_at <= now)) | (
        (InboundMessage.state == "processing") & (InboundMessage.lease_until < now))
    # Read the candidates completely first: on SQLite an open read cursor would make the
    # write transaction below fail at once instead of waiting for the lock.
    candidates = [row.id for row in InboundMessage.select(InboundMessage.id).where(due)
                  .order_by(InboundMessage.next_attempt_at, InboundMessage.id).limit(5)]
    for candidate in candidates:
        with runtime.db.atomic():
            taken = (InboundMessage.update(state="processing", lease_until=lease,
                                           claimed_by=node,
                                           attempts=InboundMessage.attempts + 1)
                     .where((InboundMessage.id == candidate) & due).execute())
        if taken:
            return InboundMessage.get_by_id(candidate)
    return None


def recover(runtime: Runtime, node: str) -> int:
    """At start: rows this node was processing when it last stopped are due again now."""
    with runtime.db.atomic():
        n = (InboundMessage.update(state="queued", lease_until=None, claimed_by="",
                                   next_attempt_at=runtime.clock())
             .where((InboundMessage.state == "processing") & (InboundMessage.claimed_by == node))
             .execute())
    if n:
        log.info("spool: %d message(s) interrupted by the last stop are queued again", n)
    return n


def conclude(row: InboundMessage, state: str, outcome: str, reason: str,
             now: dt.datetime) -> None:
    """Record a final state, inside the caller's transaction (with whatever the message made)."""
    (InboundMessage.update(state=state, outcome=outcome, reason=reason[:2000], finished_at=now,
                           lease_until=None)
     .where(InboundMessage.id == row.id).execute())


def discard_raw(runtime: Runtime, row: InboundMessage) -> None:
    """Delete the raw message of a row that ended ignored (unauthenticated, automated, a
    repeat): nothing of it is needed, and keeping it would let anyone fill the disk by
    sending mail in a member's name. The row and its reason stay. A failure here is left to
    the purge job."""
    try:
        runtime.spool.delete(row.blob_id)
    except StorageError:
        log.warning("inbound #%d: could not delete the raw message now; purge will", row.id)
        return
    with runtime.db.atomic():
        (InboundMessage.update(purged_at=runtime.clock())
         .where((InboundMessage.id == row.id) & InboundMessage.purged_at.is_null()).execute())


def retry_later(runtime: Runtime, row: InboundMessage, reason: str) -> str:
    """TempFail (the message's own trouble, e.g. a DNS timeout while checking its DKIM
    signature): back off, or park as failed after `[worker] max_attempts`."""
    cfg = runtime.settings.worker
    now = runtime.clock()
    with runtime.db.atomic():
        if row.attempts >= cfg.max_attempts:
            conclude(row, "failed", "tempfail", f"gave up after {row.attempts} attempts: {reason}",
                     now)
            return "failed"
        delay = cfg.retry_base_seconds * 2 ** max(row.attempts - 1, 0)
        (InboundMessage.update(state="queued", lease_until=None, claimed_by="", reason=reason,
                               next_attempt_at=now + dt.timedelta(seconds=delay))
         .where(InboundMessage.id == row.id).execute())
    return "queued"


def wait_for_service(runtime: Runtime, row: InboundMessage, cause: str,
                     delay: float) -> str:
    """Database or storage trouble is the service's problem, not the message's: the message
    waits `delay` seconds, queued with the reason `waiting: <cause>` (what `spool list`
    shows), and the attempt is not counted, so it never becomes `failed` for that."""
    with runtime.db.atomic():
        (InboundMessage.update(state="queued", lease_until=None, claimed_by="",
                               reason=f"waiting: {cause}", attempts=_uncounted(),
                               next_attempt_at=runtime.clock() + dt.timedelta(seconds=delay))
         .where((InboundMessage.id == row.id) & (InboundMessage.state == "processing")
                & (InboundMessage.claimed_by == row.claimed_by))
         .execute())
    return "waiting"


def park_failed(runtime: Runtime, row: InboundMessage, reason: str, details: str = "") -> None:
    """`reason` names the failure without quoting anything; `details` (a traceback, whose
    exception text may quote the message) is kept sealed for `mailbridge spool show`."""
    with runtime.db.atomic():
        conclude(row, "failed", "error", reason, runtime.clock())
        if details:
            phi.seal_error(runtime, row, details)


def release(runtime: Runtime, row: InboundMessage) -> None:
    """Hand a claimed row back untouched (due at once, the claim not counted) — unless another
    node has taken it over since."""
    with runtime.db.atomic():
        (InboundMessage.update(state="queued", lease_until=None, claimed_by="",
                               attempts=_uncounted())
         .where((InboundMessage.id == row.id) & (InboundMessage.state == "processing")
                & (InboundMessage.claimed_by == row.claimed_by))
         .execute())


def _uncounted():
    """`attempts - 1`: undoes the count that claiming added."""
    return peewee.Case(None, [(InboundMessage.attempts > 0, InboundMessage.attempts - 1)], 0)


def requeue(runtime: Runtime, row_id: int) -> bool:
    """Operator's `spool retry ID`: a failed (or stuck) message is processed again — unless
    the purge job already deleted its raw message."""
    with runtime.db.atomic():
        n = (InboundMessage.update(state="queued", attempts=0, lease_until=None, claimed_by="",
                                   next_attempt_at=runtime.clock(), finished_at=None)
             .where((InboundMessage.id == row_id) & (InboundMessage.state << ("failed", "queued"))
                    & InboundMessage.purged_at.is_null())
             .execute())
    if n:
        runtime.wake_worker.set()
    return bool(n)


def requeue_failed(runtime: Runtime) -> int:
    """Operator's `spool retry --all-failed`: every failed message whose raw message is still
    kept is processed again (not those that could not be read at all)."""
    with runtime.db.atomic():
        n = (InboundMessage.update(state="queued", attempts=0, lease_until=None, claimed_by="",
                                   next_attempt_at=runtime.clock(), finished_at=None)
             .where((InboundMessage.state == "failed") & (InboundMessage.outcome != "unreadable")
                    & InboundMessage.purged_at.is_null())
             .execute())
    if n:
        runtime.wake_worker.set()
    return n
