"""The share jobs the scheduler runs: expiry, reminders and expiry summaries — plain, idempotent
functions that log what they did, safe on any number of nodes at once. Each takes an optional
`stop` event and checks it between batches, so stopping never waits for a queue to drain."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from mailbridge.outbound import outbox
from mailbridge.runtime import Runtime
from mailbridge.shares import clinics, notify
from mailbridge.store import audit, audit_rows, bulk
from mailbridge.store.models import Clinic, Grant, SentBack, Share
from mailbridge.store.states import Audit, Delivery, GrantState

Stop = threading.Event | None


def stopped(stop: Stop) -> bool:
    return stop is not None and stop.is_set()


log = logging.getLogger(__name__)

# Grants per transaction: long enough to amortise a statement, short enough that the audit
# chain's head (which every audited request takes in turn) is held for well under a second.
EXPIRE_BATCH = 20_000


# Transactions at a time on PostgreSQL: one's UPDATE runs while another holds the chain head
# for its COPY, so the server works on both CPUs (SQLite has one writer: one at a time).
EXPIRE_LANES = 2


def expire_grants(runtime: Runtime, batch: int = EXPIRE_BATCH, stop: Stop = None) -> int:
    """Unclaimed grants past their deadline become `expired`, each with its audit event, a
    batch per statement and transaction. Safe on several nodes at once: a row changes state
    only if it is still pending, and a batch skips the rows another one holds."""
    if runtime.db.for_update:
        with ThreadPoolExecutor(EXPIRE_LANES, thread_name_prefix="expire") as pool:
            lanes = [pool.submit(_expire_lane, runtime, batch, stop, own=True)
                     for _ in range(EXPIRE_LANES)]
            total = sum(lane.result() for lane in lanes)
    else:
        total = _expire_lane(runtime, batch, stop)
    if total:
        log.info("expire: %d grant(s) expired", total)
    return total


def _expire_lane(runtime: Runtime, batch: int, stop: Stop, own: bool = False) -> int:
    """Batches until one comes back short (the rest is expired, or held by another lane that
    will finish it). `own`: the thread's connection is closed at the end."""
    total = 0
    try:
        bulk.roomy_cache(runtime.db)
        while True:
            now = runtime.clock()
            with runtime.db.atomic():
                expired = bulk.expire_due(runtime.db, now, batch)
                audit.record_each(runtime.audit_key,
                                  audit_rows.Template(kind=Audit.GRANT_EXPIRED, at=now),
                                  expired)
            total += len(expired)
            if len(expired) < batch or stopped(stop):
                return total
    finally:
        if own:
            runtime.db.close()


def remind_grants(runtime: Runtime, batch: int = 500, stop: Stop = None) -> int:
    """One reminder per unclaimed grant whose deadline is less than its clinic's
    `remind_before_hours` away (and not past). Links that could not be delivered get none.
    Each batch is marked, queued and audited in one transaction of bulk statements."""
    sent = 0
    for clinic in Clinic.select():
        rules = clinics.policy(clinic, runtime.settings)
        window = rules.remind_before_hours
        if window <= 0 or window >= rules.claim_hours:  # off, or it would follow the link
            continue
        sent += _remind_clinic(runtime, clinic, window, batch, stop)
    if sent:
        outbox.notify(runtime)
        log.info("remind: %d reminder(s) queued", sent)
    return sent


def _remind_clinic(runtime: Runtime, clinic: Clinic, window: float, batch: int,
                   stop: Stop) -> int:
    sent, last_id = 0, 0
    while True:
        now = runtime.clock()
        due = [g.id for g in Grant.select(Grant.id).join(Share)
               .where((Share.clinic == clinic) & (Grant.state == GrantState.PENDING)
                      & Grant.reminded_at.is_null() & (Grant.delivery != Delivery.FAILED)
                      & (Grant.deadline > now)
                      & (Grant.deadline <= now + dt.timedelta(hours=window))
                      # the member's own link to documents sent back to them: told once
                      & Share.id.not_in(SentBack.select(SentBack.share))
                      & (Grant.id > last_id))
               .order_by(Grant.id).limit(batch)]
        sent += notify.remind_many(runtime, due)
        if len(due) < batch or stopped(stop):
            return sent
        last_id = due[-1]


def report_expired(runtime: Runtime, batch: int = 100, stop: Stop = None) -> int:
    """One notice per share to its sender, listing the recipients whose links expired since
    the last report. A share whose lapsed grants the `expire` job has not all reached yet waits
    for the next run, so its recipients come in one notice. Returns the shares reported. A
    batch of shares is one transaction (its notices are composed inside it: they list the
    grants the UPDATE marked), hence the smaller batch."""
    shares, recipients, last_id = 0, 0, 0
    while True:
        now = runtime.clock()
        lagging = Grant.select(Grant.share).where((Grant.state == GrantState.PENDING)
                                                  & (Grant.deadline <= now))
        due = [row.share_id for row in Grant.select(Grant.share)
               .where((Grant.state == GrantState.EXPIRED) & Grant.expiry_reported_at.is_null()
                      & Grant.share.not_in(lagging) & (Grant.share > last_id))
               .distinct().order_by(Grant.share).limit(batch)]
        covered = notify.expiry_summaries(runtime, due)
        shares += len(covered)
        recipients += sum(covered.values())
        if len(due) < batch or stopped(stop):
            break
        last_id = due[-1]
    if shares:
        outbox.notify(runtime)
        log.info("expiry_summary: %d share(s) reported, %d recipient(s)", shares, recipients)
    return shares
