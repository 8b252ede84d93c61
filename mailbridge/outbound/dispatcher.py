"""Sends what the outbox holds: claims due rows, hands them to the mailer, records the result,
and tells a sender when a recipient's link could not be delivered."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from cryptography.exceptions import InvalidTag

from mailbridge import notifications
from mailbridge.db import UNAVAILABLE
from mailbridge.models import Grant, OutboundMessage
from mailbridge.outbound import outbox
from mailbridge.outbound.mailer import (
    HeldBack,
    MaildirMailer,
    PermanentFailure,
    SmtpMailer,
    TransientFailure,
)
from mailbridge.runtime import Runtime

log = logging.getLogger(__name__)

Mailer = SmtpMailer | MaildirMailer
BATCH = 20


def dispatch_due(runtime: Runtime, mailer: Mailer, *, limit: int = BATCH,
                 stop: threading.Event | None = None,
                 out: Callable[[str], None] = print, node: str = "") -> dict[str, int]:
    """Send the rows that are due; returns how many were sent, retried and failed.

    `out` shows a local operator the links written by the Maildir transport. When `stop` is
    set, the rows not yet sent are handed back to the queue.
    """
    counts = {"sent": 0, "retried": 0, "failed": 0}
    rows = outbox.claim_due(runtime, limit, node=node)
    for i, row in enumerate(rows):
        if stop is not None and stop.is_set():
            with runtime.db.atomic():
                outbox.release(runtime, rows[i:])
            break
        counts[_deliver(runtime, mailer, row, out)] += 1
    if rows:
        log.info("outbox: %d sent, %d retried, %d failed",
                 counts["sent"], counts["retried"], counts["failed"])
    return counts


def _deliver(runtime: Runtime, mailer: Mailer, row: OutboundMessage,
             out: Callable[[str], None]) -> str:
    if row.attempts > runtime.settings.outbound.max_attempts:
        # Only a row whose earlier sender died mid-send gets here.
        return _give_up(runtime, row, "attempts used up (the dispatcher stopped mid-send)")
    try:
        raw = outbox.open_message(runtime, row)
    except (InvalidTag, ValueError):
        return _give_up(runtime, row, "sealed message cannot be opened (wrong master key?)")
    try:
        mailer.send(row.envelope_from, row.to_addr, raw, carries_phi=outbox.carries_phi(row.kind))
    except PermanentFailure as exc:
        return _give_up(runtime, row, exc.reason)
    except HeldBack as exc:
        log.warning("outbox #%d (%s) held: %s", row.id, row.kind, exc.reason)
        with runtime.db.atomic():
            outbox.hold(runtime, row, exc.reason)
        return "retried"
    except TransientFailure as exc:
        return _retry(runtime, row, exc.reason)
    except Exception as exc:  # a bug in a transport must not stop the queue
        log.error("outbox #%d: unexpected %s while sending", row.id, type(exc).__name__)
        return _retry(runtime, row, f"unexpected error ({type(exc).__name__})")
    with runtime.db.atomic():
        outbox.mark_sent(runtime, row)
        if row.kind == "link" and row.grant_id is not None:
            Grant.update(delivery="sent").where(Grant.id == row.grant_id).execute()
    if row.kind in ("link", "code", "reset") and isinstance(mailer, MaildirMailer):
        # Local demo only: what a person needs from the e-mail (link or code), printed.
        for url in mailer.find_links(raw):
            out(f"{row.kind} e-mail #{row.id} written to {mailer.path}: {url}")
        if row.kind == "code":
            out(f"code e-mail #{row.id} written to {mailer.path}: {mailer.subject(raw)}")
    return "sent"


def _retry(runtime: Runtime, row: OutboundMessage, reason: str) -> str:
    with runtime.db.atomic():
        if outbox.mark_retry(runtime, row, reason) == "queued":
            return "retried"
        noticed = _link_undeliverable(runtime, row, reason)
    if noticed:
        outbox.notify(runtime)
    return "failed"


def _give_up(runtime: Runtime, row: OutboundMessage, reason: str) -> str:
    with runtime.db.atomic():
        outbox.mark_failed(runtime, row, reason)
        noticed = _link_undeliverable(runtime, row, reason)
    if noticed:
        outbox.notify(runtime)
    return "failed"


def _link_undeliverable(runtime: Runtime, row: OutboundMessage, reason: str) -> bool:
    """For a failed link e-mail: mark the grant and tell the sender, once per grant
    (notifications.link_failed). Runs in the caller's transaction."""
    if row.kind != "link" or row.grant_id is None:
        return False
    return notifications.link_failed(runtime, row.grant_id, event="link_undeliverable",
                                     reason=reason,
                                     detail={"outbound_id": row.id, "attempts": row.attempts})


class Dispatcher:
    """A thread that sends due mail, woken at once by `runtime.wake_dispatcher` and at least
    every `poll_seconds` (for retries coming due)."""

    def __init__(self, runtime: Runtime, mailer: Mailer, *, poll_seconds: float = 2.0,
                 out: Callable[[str], None] = print, node: str = "") -> None:
        self.runtime = runtime
        self.node = node
        self.mailer = mailer
        self.poll_seconds = poll_seconds
        self.out = out
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-dispatcher",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Finish the current send, hand the rest back; True if the thread has ended."""
        self._stop.set()
        self.runtime.wake_dispatcher.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        wake = self.runtime.wake_dispatcher
        try:
            while not self._stop.is_set():
                # Cleared before the round: a wake-up during the round triggers the next one.
                wake.clear()
                busy = self._round()
                if not busy:
                    wake.wait(self.poll_seconds)
        finally:
            self.runtime.db.close()

    def _round(self) -> bool:
        """One dispatch; True if the batch was full, so more may be waiting."""
        try:
            counts = dispatch_due(self.runtime, self.mailer, stop=self._stop, out=self.out,
                                  node=self.node)
        except UNAVAILABLE as exc:
            log.warning("outbox: database unavailable (%s); will retry", type(exc).__name__)
            return False
        except Exception as exc:
            log.error("outbox: dispatch round failed (%s)", type(exc).__name__)
            return False
        return sum(counts.values()) >= BATCH
