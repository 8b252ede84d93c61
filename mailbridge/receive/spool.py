"""The durable intake queue. A message is encrypted to disk and its row committed before we
answer 250; workers claim rows with a lease, so a crash leaves them to be processed again."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
from dataclasses import dataclass

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
            row = InboundMessage.create(**_row_values(raw, blob, now, channel=channel,
                                                      envelope_from=envelope_from,
                                                      envelope_to=envelope_to,
                                                      client_ip=client_ip, protocol=protocol,
                                                      source_key=source_key), **final)
    except BaseException:
        runtime.spool.delete(blob.blob_id)
        raise
    if not unreadable:
        runtime.wake_worker.set()
    return row


def _row_values(raw: bytes, blob, now: dt.datetime, *, channel: str, envelope_from: str,
                envelope_to: list[str], client_ip: str, protocol: str,
                source_key: str | None = None) -> dict:
    return dict(received_at=now, channel=channel, envelope_from=envelope_from,
                envelope_to=list(envelope_to), client_ip=client_ip, protocol=protocol,
                size=len(raw), blob_id=blob.blob_id, blob_key=blob.wrapped_key,
                raw_sha256=hashlib.sha256(raw).hexdigest(), source_key=source_key,
                next_attempt_at=now)


@dataclass
class _Waiting:
    """One message's row, waiting for the group it will be committed with."""

    values: dict
    row: InboundMessage | None = None
    error: BaseException | None = None
    done: bool = False


class GroupCommit:
    """Spool rows of concurrent SMTP/LMTP messages committed together: one transaction, so
    one fsync, for every row that arrived while the previous commit was under way.

    No thread of its own: the first caller that finds no commit running leads — it commits
    every row waiting then, its own and the others' — while the rest wait. Each caller
    returns only once its own row is committed; if the group's commit fails, every caller
    of that group gets the error (and answers 451) and its raw message is deleted."""

    def __init__(self, runtime: Runtime, *, max_rows: int = 64) -> None:
        self.runtime = runtime
        self.max_rows = max_rows
        self._cond = threading.Condition()
        self._waiting: list[_Waiting] = []
        self._leading = False

    def enqueue(self, raw: bytes, *, channel: str, envelope_from: str, envelope_to: list[str],
                client_ip: str = "", protocol: str = "") -> InboundMessage:
        """Like `enqueue`: stored and committed (with others) when it returns, else raises."""
        runtime = self.runtime
        blob = put_bytes(runtime.spool, raw)  # encrypted and fsync'd by each thread itself
        mine = _Waiting(_row_values(raw, blob, runtime.clock(), channel=channel,
                                    envelope_from=envelope_from, envelope_to=envelope_to,
                                    client_ip=client_ip, protocol=protocol))
        try:
            self._wait_for_commit(mine)
        except BaseException:
            runtime.spool.delete(blob.blob_id)
            raise
        runtime.wake_worker.set()
        assert mine.row is not None
        return mine.row

    def _wait_for_commit(self, mine: _Waiting) -> None:
        with self._cond:
            self._waiting.append(mine)
            while not mine.done:
                if self._leading:
                    self._cond.wait()
                    continue
                self._leading = True
                group = self._waiting[:self.max_rows]
                del self._waiting[:self.max_rows]
                self._cond.release()
                try:
                    self._commit(group)
                finally:
                    self._cond.acquire()
                    self._leading = False
                    self._cond.notify_all()
        if mine.error is not None:
            raise mine.error

    def _commit(self, group: list[_Waiting]) -> None:
        try:
            with self.runtime.db.atomic():
                rows = [InboundMessage.create(state=Inbound.QUEUED, **w.values) for w in group]
        except BaseException as exc:
            log.debug("spool: a commit of %d message(s) failed", len(group))
            for waiting in group:
                waiting.error, waiting.done = exc, True
            if not isinstance(exc, Exception):
                raise
            return
        log.debug("spool: %d message(s) committed in one transaction", len(group))
        for waiting, row in zip(group, rows, strict=True):
            waiting.row, waiting.done = row, True


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
