"""Scheduled jobs: plain, idempotent functions that log what they did, and their wiring into
APScheduler inside `mailbridge serve`. Each takes an optional `stop` event and checks it
between batches, so stopping the service never waits for a whole queue to drain."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler

from mailbridge import audit, db, notifications, orphans, spool, worker
from mailbridge.models import (
    Grant,
    InboundMessage,
    OneTimeCode,
    PasswordReset,
    WebSession,
)
from mailbridge.outages import Outage, cause_of
from mailbridge.outbound import dispatcher, outbox
from mailbridge.outbound.mailer import make_mailer
from mailbridge.runtime import Runtime
from mailbridge.storage import StorageError

Stop = threading.Event | None


def _stopped(stop: Stop) -> bool:
    return stop is not None and stop.is_set()

log = logging.getLogger(__name__)


def expire_grants(runtime: Runtime, batch: int = 500, stop: Stop = None) -> int:
    """Unclaimed grants past their deadline become `expired`. Safe on several nodes at once:
    each row changes state only if it is still pending."""
    total = 0
    while True:
        now = runtime.clock()
        due = list(Grant.select().where((Grant.state == "pending") & (Grant.deadline <= now))
                   .order_by(Grant.id).limit(batch))
        if not due:
            break
        with runtime.db.atomic():
            for grant in due:
                changed = (Grant.update(state="expired", ended_at=now)
                           .where((Grant.id == grant.id) & (Grant.state == "pending")).execute())
                if changed:
                    audit.record("grant_expired", now, share=grant.share_id, grant=grant)
                    total += 1
        if len(due) < batch or _stopped(stop):
            break
    if total:
        log.info("expire: %d grant(s) expired", total)
    return total


def remind_grants(runtime: Runtime, batch: int = 500, stop: Stop = None) -> int:
    """One reminder per unclaimed grant whose deadline is less than `[shares]
    remind_before_hours` away (and not past). Links that could not be delivered get none."""
    shares = runtime.settings.shares
    window = shares.remind_before_hours
    if window <= 0 or window >= shares.claim_hours:  # off, or it would follow the link at once
        return 0
    sent, last_id = 0, 0
    while True:
        now = runtime.clock()
        due = [g.id for g in Grant.select(Grant.id)
               .where((Grant.state == "pending") & Grant.reminded_at.is_null()
                      & (Grant.delivery != "failed") & (Grant.deadline > now)
                      & (Grant.deadline <= now + dt.timedelta(hours=window))
                      & (Grant.id > last_id))
               .order_by(Grant.id).limit(batch)]
        for grant_id in due:
            if _stopped(stop):
                break
            sent += notifications.remind(runtime, grant_id)
        if len(due) < batch or _stopped(stop):
            break
        last_id = due[-1]
    if sent:
        outbox.notify(runtime)
        log.info("remind: %d reminder(s) queued", sent)
    return sent


def report_expired(runtime: Runtime, batch: int = 200, stop: Stop = None) -> int:
    """One notice per share to its sender, listing the recipients whose links expired since
    the last report. A share whose lapsed grants the `expire` job has not all reached yet waits
    for the next run, so its recipients come in one notice. Returns the shares reported."""
    shares, recipients, last_id = 0, 0, 0
    while True:
        now = runtime.clock()
        lagging = Grant.select(Grant.share).where((Grant.state == "pending")
                                                  & (Grant.deadline <= now))
        due = [row.share_id for row in Grant.select(Grant.share)
               .where((Grant.state == "expired") & Grant.expiry_reported_at.is_null()
                      & Grant.share.not_in(lagging) & (Grant.share > last_id))
               .distinct().order_by(Grant.share).limit(batch)]
        for share_id in due:
            if _stopped(stop):
                break
            covered = notifications.expiry_summary(runtime, share_id)
            shares += bool(covered)
            recipients += covered
        if len(due) < batch or _stopped(stop):
            break
        last_id = due[-1]
    if shares:
        outbox.notify(runtime)
        log.info("expiry_summary: %d share(s) reported, %d recipient(s)", shares, recipients)
    return shares


def dispatch_outbox(runtime: Runtime, stop: Stop = None) -> int:
    """Send what is due in the outbox (for cron; `serve` also has a dispatcher thread).
    Returns the messages handled: sent, retried or failed."""
    mailer = make_mailer(runtime.settings)
    node = worker.node_name(runtime)
    total = 0
    while not _stopped(stop):
        counts = dispatcher.dispatch_due(runtime, mailer, out=lambda _line: None, node=node,
                                         stop=stop)
        total += sum(counts.values())
        if sum(counts.values()) < dispatcher.BATCH:
            break
    return total


def process_spool(runtime: Runtime, limit: int = 10_000, stop: Stop = None) -> int:
    """Process the inbound messages that are due (for cron; `serve` also has a worker
    thread). Returns how many were taken."""
    node = worker.node_name(runtime)
    outage = worker.new_outage(runtime, "spool")
    taken = 0
    while taken < limit and not _stopped(stop) and worker.run_once(runtime, node, outage):
        taken += 1
    if taken:
        log.info("spool: %d message(s) processed", taken)
    return taken


def purge(runtime: Runtime, batch: int = 500, stop: Stop = None) -> int:
    """Delete what is kept only for a while: raw spooled messages of finished rows (`[retention]
    spool_days`; the shares keep their documents), ended portal sessions (`session_days`),
    spent codes and reset links (`code_days`), and files no row references (left by a crash)
    once `orphan_hours` old. Never documents of a share, shares or audit events."""
    now = runtime.clock()
    retention = runtime.settings.retention
    raw = _purge_spool(runtime, now - dt.timedelta(days=retention.spool_days), now, batch, stop)
    session_cutoff = now - dt.timedelta(days=retention.session_days)
    # A session never signed out ends at its absolute timeout.
    lifetime = dt.timedelta(hours=runtime.settings.web.session_absolute_hours)
    code_cutoff = now - dt.timedelta(days=retention.code_days)
    with runtime.db.atomic():
        sessions = WebSession.delete().where(
            (WebSession.ended_at < session_cutoff)
            | (WebSession.ended_at.is_null() & (WebSession.created_at < session_cutoff - lifetime))
        ).execute()
        codes = OneTimeCode.delete().where((OneTimeCode.used_at < code_cutoff)
                                           | (OneTimeCode.expires_at < code_cutoff)).execute()
        resets = PasswordReset.delete().where((PasswordReset.used_at < code_cutoff)
                                              | (PasswordReset.expires_at < code_cutoff)).execute()
    orphaned = 0 if _stopped(stop) else orphans.sweep(runtime, stop=stop)
    total = raw + sessions + codes + resets + orphaned
    if total:
        log.info("purge: %d raw message(s), %d session(s), %d code(s), %d reset link(s), "
                 "%d orphaned file(s)", raw, sessions, codes, resets, orphaned)
    return total


def _purge_spool(runtime: Runtime, cutoff: dt.datetime, now: dt.datetime, batch: int,
                 stop: Stop = None) -> int:
    purged, last_id = 0, 0
    while True:
        rows = list(InboundMessage.select(InboundMessage.id, InboundMessage.blob_id)
                    .where(InboundMessage.state.in_(spool.FINAL_STATES)
                           & InboundMessage.purged_at.is_null()
                           & (InboundMessage.received_at < cutoff) & (InboundMessage.id > last_id))
                    .order_by(InboundMessage.id).limit(batch))
        for row in rows:
            try:
                runtime.spool.delete(row.blob_id)  # first: a crash here leaves it for next time
            except StorageError:
                log.warning("purge: could not delete the raw message of inbound #%d", row.id)
                continue
            with runtime.db.atomic():
                purged += (InboundMessage.update(purged_at=now)
                           .where((InboundMessage.id == row.id)
                                  & InboundMessage.purged_at.is_null()).execute())
        if len(rows) < batch or _stopped(stop):
            return purged
        last_id = rows[-1].id


JOBS: dict[str, tuple[Callable[[Runtime], int], float]] = {
    # name: (function, interval in seconds)
    "expire": (expire_grants, 60.0),
    "remind": (remind_grants, 60.0),
    "expiry_summary": (report_expired, 60.0),
    "outbox": (dispatch_outbox, 60.0),
    "spool": (process_spool, 60.0),
    "purge": (purge, 3600.0),
}


def build_scheduler(runtime: Runtime,
                    stop: threading.Event | None = None) -> BackgroundScheduler:
    """The jobs on their intervals; `stop` ends a running job between batches."""
    stop = stop if stop is not None else threading.Event()
    scheduler = BackgroundScheduler(timezone="UTC")
    for name, (function, seconds) in JOBS.items():
        guarded = functools.partial(_guarded, function, Outage(log, name), runtime, stop)
        # coalesce + a grace time: runs missed while the service was down happen once at start.
        scheduler.add_job(guarded, "interval", seconds=seconds, id=name, name=name,
                          coalesce=True, max_instances=1, misfire_grace_time=None,
                          next_run_time=runtime.clock())
    return scheduler


def _guarded(function: Callable[..., int], outage: Outage, runtime: Runtime,
             stop: threading.Event) -> int | None:
    """A run that meets a database or storage outage logs it once per outage (not a
    traceback a minute); the next run retries, on a fresh connection."""
    if stop.is_set():
        return None
    try:
        done = function(runtime, stop=stop)
    except (*db.UNAVAILABLE, StorageError) as exc:
        outage.failed(cause_of(exc))
        return None
    finally:
        runtime.db.close()  # scheduler threads are pooled: do not keep a connection idle
    outage.ended()
    return done
