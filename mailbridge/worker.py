"""The intake worker: claims spooled messages and runs each through the pipeline.

Whatever happens, a claimed message ends in a recorded state: processed, retried later
(database trouble), or parked as `failed` with its error for the operator.
"""

from __future__ import annotations

import logging
import socket
import threading
import traceback

import peewee

from mailbridge import db, pipeline, spool
from mailbridge.models import InboundMessage
from mailbridge.outcomes import TempFail
from mailbridge.runtime import Runtime
from mailbridge.storage import StorageError

log = logging.getLogger(__name__)


def node_name(runtime: Runtime) -> str:
    """Identifies this process's node, so its own interrupted work is resumed at start."""
    return f"{socket.gethostname()}:{runtime.settings.service.data_dir}"


def handle(runtime: Runtime, row: InboundMessage) -> str:
    """Process one claimed row; returns the state it ended in."""
    try:
        raw = spool.read_raw(runtime, row)
        outcome = pipeline.process(runtime, row, raw)
        if isinstance(outcome, TempFail):
            log.info("inbound #%d: temporary failure; will retry", row.id)
            return spool.retry_later(runtime, row, outcome.reason)
        return type(outcome).__name__.lower()
    except peewee.IntegrityError:
        # Another worker acted on a copy of this message at the same moment (unique keys):
        # the next attempt sees that and ends it as a repeat.
        log.info("inbound #%d: a copy was handled concurrently; will look again", row.id)
        return spool.retry_later(runtime, row, "a copy was handled at the same moment")
    except db.UNAVAILABLE as exc:
        db.reset_connection(runtime.db)
        log.warning("inbound #%d: database unavailable (%s); will retry", row.id,
                    type(exc).__name__)
        try:
            return spool.retry_later(runtime, row, f"database unavailable: {type(exc).__name__}")
        except db.UNAVAILABLE:
            return "lease"  # the lease runs out and the row is claimed again
    except StorageError as exc:
        log.warning("inbound #%d: storage problem (%s); will retry", row.id, exc)
        return spool.retry_later(runtime, row, f"storage problem: {exc}")
    except Exception as exc:
        # The traceback goes to the spool row, sealed (operators only), not to the log:
        # exception messages can quote message content.
        log.error("inbound #%d: unexpected error; parked as failed (see `mailbridge spool show "
                  "%d`)", row.id, row.id)
        spool.park_failed(runtime, row, f"unexpected error ({type(exc).__name__}); see "
                          f"`mailbridge spool show {row.id}`", traceback.format_exc(limit=20))
        return "failed"


def run_once(runtime: Runtime, node: str) -> bool:
    """Process one due message if there is one; True if there was."""
    row = spool.claim_next(runtime, node)
    if row is None:
        return False
    handle(runtime, row)
    return True


class Worker:
    """A thread that drains the spool, waking when SMTP intake signals new mail."""

    def __init__(self, runtime: Runtime, node: str) -> None:
        self.runtime = runtime
        self.node = node
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mailbridge-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Finish the message in hand, take no more. False if it did not finish in time (its
        row is resumed at the next start)."""
        self._stop.set()
        self.runtime.wake_worker.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        wake = self.runtime.wake_worker
        while not self._stop.is_set():
            try:
                busy = run_once(self.runtime, self.node)
            except db.UNAVAILABLE as exc:
                db.reset_connection(self.runtime.db)
                log.warning("worker: database unavailable (%s)", type(exc).__name__)
                busy = False
            if not busy:
                wake.wait(self.runtime.settings.worker.poll_seconds)
                wake.clear()
        self.runtime.db.close()
