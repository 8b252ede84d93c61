"""The durable intake queue. A message is encrypted to disk and its row committed before we
answer 250; workers claim rows with a lease, so a crash leaves them to be processed again."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging

from mailbridge.runtime import Runtime
from mailbridge.store import queue, sealed
from mailbridge.store.blobs import put_bytes, read_all
from mailbridge.store.inbound import conclude
from mailbridge.store.models import InboundMessage
from mailbridge.store.states import Inbound

log = logging.getLogger(__name__)

QUEUE = queue.Queue(InboundMessage, waiting=Inbound.QUEUED, working=Inbound.PROCESSING)


def enqueue(runtime: Runtime, raw: bytes, *, channel: str, envelope_from: str,
            envelope_to: list[str], source_key: str | None = None,
            unreadable: str = "", client_ip: str = "", protocol: str = "") -> InboundMessage:
    """Store and commit; raises storage.StorageFull/StorageError or a database error, in
    which case nothing was accepted. `unreadable` (a reason) records a message that cannot be
    processed at all straight as `failed`, so the operator sees it in `spool list`."""
    blob = put_bytes(runtime.spool, raw)
    now = runtime.clock()
    final = {"state": Inbound.FAILED, "outcome": "unreadable", "reason": unreadable,
             "finished_at": now} if unreadable else {"state": Inbound.QUEUED}
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
    # A few candidates: another worker may take the first between our read and our update.
    claimed = queue.claim(runtime.db, QUEUE, now=runtime.clock(), node=node, limit=1, scan=5,
                          lease_seconds=runtime.settings.worker.lease_seconds)
    return InboundMessage.get_by_id(claimed[0]) if claimed else None


def recover(runtime: Runtime, node: str) -> int:
    """At start: rows this node was processing when it last stopped are due again now."""
    n = queue.recover(runtime.db, QUEUE, node, runtime.clock())
    if n:
        log.info("spool: %d message(s) interrupted by the last stop are queued again", n)
    return n


def retry_later(runtime: Runtime, row: InboundMessage, reason: str) -> str:
    """TempFail (the message's own trouble, e.g. a DNS timeout while checking its DKIM
    signature): back off, or park as failed after `[worker] max_attempts`."""
    cfg = runtime.settings.worker
    now = runtime.clock()
    with runtime.db.atomic():
        if row.attempts >= cfg.max_attempts:
            conclude(row, Inbound.FAILED, "tempfail",
                     f"gave up after {row.attempts} attempts: {reason}", now)
            return Inbound.FAILED
        delay = cfg.retry_base_seconds * 2 ** max(row.attempts - 1, 0)
        (InboundMessage.update(state=Inbound.QUEUED, lease_until=None, claimed_by="", reason=reason,
                               next_attempt_at=now + dt.timedelta(seconds=delay))
         .where(InboundMessage.id == row.id).execute())
    return Inbound.QUEUED


def wait_for_service(runtime: Runtime, row: InboundMessage, cause: str,
                     delay: float) -> str:
    """Database or storage trouble is the service's problem, not the message's: the message
    waits `delay` seconds, queued with the reason `waiting: <cause>` (what `spool list`
    shows), and the attempt is not counted, so it never becomes `failed` for that."""
    with runtime.db.atomic():
        queue.release(QUEUE, [row.id], row.claimed_by, reason=f"waiting: {cause}",
                      next_attempt_at=runtime.clock() + dt.timedelta(seconds=delay))
    return "waiting"


def park_failed(runtime: Runtime, row: InboundMessage, reason: str, details: str = "") -> None:
    """`reason` names the failure without quoting anything; `details` (a traceback, whose
    exception text may quote the message) is kept sealed for `mailbridge spool show`."""
    with runtime.db.atomic():
        conclude(row, Inbound.FAILED, "error", reason, runtime.clock())
        if details:
            sealed.seal_error(runtime.phi_key, row, details)


def release(runtime: Runtime, row: InboundMessage) -> None:
    """Hand a claimed row back untouched (due at once, the claim not counted) — unless another
    node has taken it over since."""
    with runtime.db.atomic():
        queue.release(QUEUE, [row.id], row.claimed_by)


def requeue(runtime: Runtime, row_id: int) -> bool:
    """Operator's `spool retry ID`: a failed (or stuck) message is processed again — unless
    the purge job already deleted its raw message."""
    with runtime.db.atomic():
        n = (InboundMessage.update(state=Inbound.QUEUED, attempts=0, lease_until=None,
                                   claimed_by="", next_attempt_at=runtime.clock(),
                                   finished_at=None)
             .where((InboundMessage.id == row_id)
                    & (InboundMessage.state << (Inbound.FAILED, Inbound.QUEUED))
                    & InboundMessage.purged_at.is_null())
             .execute())
    if n:
        runtime.wake_worker.set()
    return bool(n)


def requeue_failed(runtime: Runtime) -> int:
    """Operator's `spool retry --all-failed`: every failed message whose raw message is still
    kept is processed again (not those that could not be read at all)."""
    with runtime.db.atomic():
        n = (InboundMessage.update(state=Inbound.QUEUED, attempts=0, lease_until=None,
                                   claimed_by="", next_attempt_at=runtime.clock(),
                                   finished_at=None)
             .where((InboundMessage.state == Inbound.FAILED)
                    & (InboundMessage.outcome != "unreadable")
                    & InboundMessage.purged_at.is_null())
             .execute())
    if n:
        runtime.wake_worker.set()
    return n
