"""The intake worker: claims spooled messages and runs each through the pipeline.

Whatever happens, a claimed message ends in a recorded state: processed, retried later
(temporary trouble of the message), waiting (database or storage trouble: the service's
problem, never counted against the message), or parked as `failed` with its error for the
operator.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import traceback
from pathlib import Path

import peewee

from mailbridge import pipeline
from mailbridge.outcomes import TempFail
from mailbridge.receive import spool
from mailbridge.runtime import Runtime
from mailbridge.store import db, queue
from mailbridge.store.blobs import StorageError
from mailbridge.store.models import InboundMessage
from mailbridge.store.outages import Outage, cause_of

log = logging.getLogger(__name__)


def node_name(runtime: Runtime) -> str:
    """This node's stable id, so its own interrupted work is resumed at start: `[service]
    node_id`, else a random id created once in `<data_dir>/node-id` (a container restarted
    under a new hostname is still the same node)."""
    configured = runtime.settings.service.node_id
    if configured:
        return configured
    return read_or_create_node_id(runtime.settings.service.data_dir / "node-id")


def read_or_create_node_id(path: Path) -> str:
    with contextlib.suppress(FileNotFoundError):
        existing = path.read_text().strip()
        if existing:
            return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    new = f"node-{secrets.token_hex(8)}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process of this node won the race
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(new + "\n")
        f.flush()
        os.fsync(f.fileno())
    return new


def is_infrastructure(exc: BaseException) -> bool:
    """Database or storage trouble that will pass: locked, unreachable, connection lost, disk
    full or failing. A missing or corrupt blob is the message's own problem."""
    if isinstance(exc, db.INFRASTRUCTURE):
        return True
    cause = exc.__cause__
    return (isinstance(exc, StorageError) and isinstance(cause, OSError)
            and not isinstance(cause, FileNotFoundError))


def handle(runtime: Runtime, row: InboundMessage, outage: Outage) -> str:
    """Process one claimed row; returns the state it ended in. Raises a database error only
    when even recording the wait failed: the row is still claimed by this node then."""
    try:
        raw = spool.read_raw(runtime, row)
        outcome = pipeline.process(runtime, row, raw)
        outage.ended()
        if isinstance(outcome, TempFail):
            log.info("inbound #%d: temporary failure; will retry", row.id)
            return spool.retry_later(runtime, row, outcome.reason)
        return type(outcome).__name__.lower()
    except Exception as exc:
        if isinstance(exc, peewee.IntegrityError):
            # Another worker acted on a copy of this message at the same moment (unique
            # keys): the next attempt sees that and ends it as a repeat.
            log.info("inbound #%d: a copy was handled concurrently; will look again", row.id)
            return spool.retry_later(runtime, row, "a copy was handled at the same moment")
        if is_infrastructure(exc):
            cause = cause_of(exc)
            return spool.wait_for_service(runtime, row, cause, outage.failed(cause))
        if isinstance(exc, (*db.UNAVAILABLE, StorageError)):
            log.warning("inbound #%d: %s; will retry", row.id, type(exc).__name__)
            return spool.retry_later(runtime, row, f"{type(exc).__name__}")
        # The traceback goes to the spool row, sealed (operators only), not to the log:
        # exception messages can quote message content.
        log.error("inbound #%d: unexpected error; parked as failed (see `mailbridge spool show "
                  "%d`)", row.id, row.id)
        spool.park_failed(runtime, row, f"unexpected error ({type(exc).__name__}); see "
                          f"`mailbridge spool show {row.id}`", traceback.format_exc(limit=20))
        return "failed"


def run_once(runtime: Runtime, node: str, outage: Outage | None = None) -> bool:
    """Process one due message if there is one; True if there was. The row's lease is
    renewed while it is in hand. A database error while recording its end propagates (the
    row is then taken again when its lease runs out, or at this node's next start)."""
    row = spool.claim_next(runtime, node)
    if row is None:
        return False
    with lease_kept(runtime, row, node):
        handle(runtime, row, outage or new_outage(runtime))
    return True


def lease_kept(runtime: Runtime, row: InboundMessage, node: str):
    """The row's lease renewed while it is in hand."""
    return queue.kept(runtime.db, runtime.clock, runtime.settings.worker.lease_seconds,
                      spool.QUEUE, [row.id], node)


def new_outage(runtime: Runtime, part: str = "worker") -> Outage:
    cfg = runtime.settings.worker
    return Outage(log, part, base_seconds=cfg.retry_base_seconds,
                  max_seconds=cfg.retry_max_seconds, announce=runtime.announce_outage)


class Worker:
    """A thread that drains the spool, waking when SMTP intake signals new mail."""

    def __init__(self, runtime: Runtime, node: str) -> None:
        self.runtime = runtime
        self.node = node
        self.outage = new_outage(runtime)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mailbridge-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def signal_stop(self) -> None:
        """Take no more messages; the one in hand is finished."""
        self._stop.set()
        self.runtime.wake_worker.set()

    def stop(self, timeout: float = 30.0) -> bool:
        """Finish the message in hand, take no more. False if it did not finish in time (its
        row is resumed at the next start)."""
        self.signal_stop()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        wake = self.runtime.wake_worker
        held: list[InboundMessage] = []  # claimed, not yet ended (the head may be mid-outage)
        while not self._stop.is_set():
            busy = False
            try:
                if held:
                    # Back to the queue the moment the database answers, not after the lease.
                    for row in held:
                        spool.release(self.runtime, row)
                    held = []
                held = claim_batch(self.runtime, self.node)
                if held:
                    busy = True
                    with queue.kept(self.runtime.db, self.runtime.clock,
                                    self.runtime.settings.worker.lease_seconds, spool.QUEUE,
                                    [row.id for row in held], self.node):
                        while held and not self._stop.is_set():
                            handle(self.runtime, held[0], self.outage)
                            held.pop(0)
                    for row in held:  # stopping: the rest of the batch goes back at once
                        spool.release(self.runtime, row)
                    held = []
            except db.UNAVAILABLE as exc:
                self.outage.failed(cause_of(exc))
                busy = False
            if not busy:
                wake.wait(self.runtime.settings.worker.poll_seconds)
                wake.clear()
        self.runtime.db.close()


def claim_batch(runtime: Runtime, node: str) -> list[InboundMessage]:
    """Take up to `[worker] batch` due messages, oldest first (other workers take the next
    ones: a batch saves round trips, not fairness)."""
    size = runtime.settings.worker.batch
    ids = queue.claim(runtime.db, spool.QUEUE, now=runtime.clock(), node=node, limit=size,
                      scan=size + 4, lease_seconds=runtime.settings.worker.lease_seconds)
    if not ids:
        return []
    rows = {row.id: row for row in InboundMessage.select().where(InboundMessage.id.in_(ids))}
    return [rows[i] for i in ids if i in rows]
