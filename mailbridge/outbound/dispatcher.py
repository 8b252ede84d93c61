"""Sends what the outbox holds: claims due rows, hands them to the mailer, records the result,
and tells a sender when a recipient's link could not be delivered."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable

from cryptography.exceptions import InvalidTag

from mailbridge.outbound import outbox
from mailbridge.outbound.mailer import (
    DeliveryError,
    HeldBack,
    MaildirMailer,
    PermanentFailure,
    SmtpMailer,
    TransientFailure,
)
from mailbridge.runtime import Runtime
from mailbridge.store import queue
from mailbridge.store.db import UNAVAILABLE
from mailbridge.store.models import Grant, OutboundMessage
from mailbridge.store.outages import Outage, cause_of
from mailbridge.store.states import Delivery, Outbound

log = logging.getLogger(__name__)

Mailer = SmtpMailer | MaildirMailer
BATCH = 20


class SentUnrecorded(Exception):
    """The relay has the message but the database could not record it (an outage)."""


# What to do when the outbox gives up on an e-mail, in the transaction that marks it failed
# (a link e-mail: mark the grant, tell the sender; see shares.notify.mail_failed). True if
# that queued mail of its own.
OnFailure = Callable[[Runtime, OutboundMessage, str], bool]

# Database writes a dispatcher still owes (record a sent row, hand back claimed rows), done
# as soon as the database answers again instead of waiting for the lease to run out.
Owed = list[Callable[[], object]]


def dispatch_due(runtime: Runtime, mailer: Mailer, *, limit: int = BATCH,
                 stop: threading.Event | None = None,
                 out: Callable[[str], None] = print, node: str = "",
                 owed: Owed | None = None,
                 on_failure: OnFailure | None = None,
                 keep_connection: bool = False) -> dict[str, int]:
    """Send the rows that are due; returns how many were sent, retried and failed.

    The batch goes over one relay connection (the mailer reconnects after an error); it is
    closed at the end unless `keep_connection` (the dispatcher thread, with more to send).

    `out` shows a local operator the links written by the Maildir transport. When `stop` is
    set, the rows not yet sent are handed back to the queue. The batch's leases are renewed
    while it is in hand. A database error ends the batch (and propagates): the rows not sent
    are handed back, and what could not be written then is added to `owed`.
    """
    try:
        return _dispatch(runtime, mailer, limit, stop, out, node, owed, on_failure)
    finally:
        if not keep_connection:
            mailer.close()


def _dispatch(runtime: Runtime, mailer: Mailer, limit: int, stop: threading.Event | None,
              out: Callable[[str], None], node: str, owed: Owed | None,
              on_failure: OnFailure | None) -> dict[str, int]:
    counts = {"sent": 0, "retried": 0, "failed": 0}
    rows = outbox.claim_due(runtime, limit, node=node)
    if not rows:
        return counts
    with queue.kept(runtime.db, runtime.clock, runtime.settings.worker.lease_seconds,
                    outbox.QUEUE, [r.id for r in rows], node):
        for i, row in enumerate(rows):
            if stop is not None and stop.is_set():
                _hand_back(runtime, rows[i:], owed)
                break
            try:
                result = _deliver(runtime, mailer, row, out, on_failure)
                counts[result] += 1
                runtime.metrics.delivered(row.kind, result)
            except SentUnrecorded as exc:
                counts["sent"] += 1
                runtime.metrics.delivered(row.kind, "sent")
                if owed is not None:
                    owed.append(functools.partial(_record_sent, runtime, row))
                _hand_back(runtime, rows[i + 1:], owed)
                raise exc.__cause__ from None
            except UNAVAILABLE:
                _hand_back(runtime, rows[i:], owed)
                raise
    log.info("outbox: %d sent, %d retried, %d failed",
             counts["sent"], counts["retried"], counts["failed"])
    return counts


def settle_owed(owed: Owed) -> None:
    """Do the writes owed from an outage; raises a database error if it is not over."""
    while owed:
        try:
            owed[0]()
        except UNAVAILABLE:
            raise
        except Exception as exc:  # not an outage: retrying would not help
            log.error("outbox: a write owed since an outage failed (%s)", type(exc).__name__)
        owed.pop(0)


def _hand_back(runtime: Runtime, rows: list[OutboundMessage], owed: Owed | None) -> None:
    if not rows:
        return
    try:
        _release(runtime, rows)
    except UNAVAILABLE:
        if owed is None:
            raise
        owed.append(functools.partial(_release, runtime, rows))


def _release(runtime: Runtime, rows: list[OutboundMessage]) -> None:
    with runtime.db.atomic():
        outbox.release(runtime, rows)


def _record_sent(runtime: Runtime, row: OutboundMessage) -> None:
    with runtime.db.atomic():
        outbox.mark_sent(runtime, row)
        if row.kind == "link" and row.grant_id is not None:
            Grant.update(delivery=Delivery.SENT).where(Grant.id == row.grant_id).execute()


def _deliver(runtime: Runtime, mailer: Mailer, row: OutboundMessage,
             out: Callable[[str], None], on_failure: OnFailure | None) -> str:
    if row.attempts > runtime.settings.outbound.max_attempts:
        # Only a row whose earlier sender died mid-send gets here.
        return _give_up(runtime, row, on_failure,
                        "attempts used up (the dispatcher stopped mid-send)")
    try:
        raw = outbox.open_message(runtime, row)
    except (InvalidTag, ValueError):
        return _give_up(runtime, row, on_failure,
                        "sealed message cannot be opened (wrong master key?)")
    # Recorded the moment the relay says 250, before the connection is closed; from then on
    # nothing that goes wrong makes it a retry (that would send it twice).
    progress = {"accepted": False, "recorded": False}

    def accepted() -> None:
        progress["accepted"] = True
        _record_sent(runtime, row)
        progress["recorded"] = True

    try:
        mailer.send(row.envelope_from, row.to_addr, raw, on_accepted=accepted,
                    carries_phi=outbox.carries_phi(row.kind))
        if not progress["accepted"]:  # a transport that does not report acceptance
            accepted()
    except Exception as exc:
        if progress["accepted"] and not progress["recorded"]:
            raise SentUnrecorded() from (exc.__cause__ if isinstance(exc, DeliveryError)
                                         else exc)
        if not progress["accepted"]:
            if isinstance(exc, PermanentFailure):
                return _give_up(runtime, row, on_failure, exc.reason)
            if isinstance(exc, HeldBack):
                log.warning("outbox #%d (%s) held: %s", row.id, row.kind, exc.reason)
                with runtime.db.atomic():
                    outbox.hold(runtime, row, exc.reason)
                return "retried"
            if isinstance(exc, TransientFailure):
                return _retry(runtime, row, on_failure, exc.reason)
            # a bug in a transport must not stop the queue
            log.error("outbox #%d: unexpected %s while sending", row.id, type(exc).__name__)
            return _retry(runtime, row, on_failure, f"unexpected error ({type(exc).__name__})")
        # The relay has it and it is recorded: a failing QUIT changes nothing.
    if row.kind in ("link", "code", "reset", "access_code") and isinstance(mailer, MaildirMailer):
        # Local demo only: what a person needs from the e-mail (link or code), printed.
        # Grant id and recipient domain tell links apart; the full address stays out of logs.
        whom = (f" (grant #{row.grant_id}, to …@{row.to_addr.rpartition('@')[2]})"
                if row.grant_id is not None else "")
        for url in mailer.find_links(raw):
            out(f"{row.kind} e-mail #{row.id}{whom} written to {mailer.path}: {url}")
        if row.kind in ("code", "access_code"):
            out(f"{row.kind} e-mail #{row.id} written to {mailer.path}: {mailer.subject(raw)}")
    return "sent"


def _retry(runtime: Runtime, row: OutboundMessage, on_failure: OnFailure | None,
           reason: str) -> str:
    with runtime.db.atomic():
        if outbox.mark_retry(runtime, row, reason) == Outbound.QUEUED:
            return "retried"
        noticed = on_failure is not None and on_failure(runtime, row, reason)
    if noticed:
        outbox.notify(runtime)
    return "failed"


def _give_up(runtime: Runtime, row: OutboundMessage, on_failure: OnFailure | None,
             reason: str) -> str:
    with runtime.db.atomic():
        outbox.mark_failed(runtime, row, reason)
        noticed = on_failure is not None and on_failure(runtime, row, reason)
    if noticed:
        outbox.notify(runtime)
    return "failed"


class Dispatcher:
    """A thread that sends due mail, woken at once by `runtime.wake_dispatcher` and at least
    every `poll_seconds` (for retries coming due)."""

    def __init__(self, runtime: Runtime, mailer: Mailer, *, poll_seconds: float = 2.0,
                 out: Callable[[str], None] = print, node: str = "",
                 on_failure: OnFailure | None = None) -> None:
        self.runtime = runtime
        self.on_failure = on_failure
        self.node = node
        self.mailer = mailer
        self.poll_seconds = poll_seconds
        self.out = out
        self.outage = Outage(log, "outbox", announce=runtime.announce_outage)
        self._owed: Owed = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-dispatcher",
                                        daemon=True)
        self._thread.start()

    def signal_stop(self) -> None:
        """Send nothing more after the e-mail in hand; the rest of the batch goes back."""
        self._stop.set()
        self.runtime.wake_dispatcher.set()

    def stop(self, timeout: float = 10.0) -> bool:
        """Finish the current send, hand the rest back; True if the thread has ended."""
        self.signal_stop()
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
                if not busy and not wake.wait(self.poll_seconds):
                    self.mailer.close()  # idle for a whole poll: no relay connection held
        finally:
            self.mailer.close()
            self.runtime.db.close()

    def _round(self) -> bool:
        """One dispatch; True if the batch was full, so more may be waiting."""
        try:
            settle_owed(self._owed)
            counts = dispatch_due(self.runtime, self.mailer, stop=self._stop, out=self.out,
                                  node=self.node, owed=self._owed, on_failure=self.on_failure,
                                  keep_connection=True)
        except UNAVAILABLE as exc:
            self.outage.failed(cause_of(exc))
            return False
        except Exception as exc:
            log.error("outbox: dispatch round failed (%s)", type(exc).__name__)
            return False
        self.outage.ended()
        return sum(counts.values()) >= BATCH
