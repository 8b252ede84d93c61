"""What `mailbridge serve` runs on a timer (and `mailbridge jobs run NAME` runs once): the
share jobs, the outbox and spool queues for cron set-ups, and the purge — each on its
interval in APScheduler, an outage logged once per outage rather than a traceback a minute."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler

from mailbridge.outbound import dispatcher
from mailbridge.outbound.mailer import make_mailer
from mailbridge.receive import worker
from mailbridge.runtime import Runtime
from mailbridge.shares import jobs, notify, purge
from mailbridge.shares.jobs import Stop, stopped
from mailbridge.store import db, locks
from mailbridge.store.blobs import StorageError
from mailbridge.store.outages import Outage, cause_of

log = logging.getLogger(__name__)


def dispatch_outbox(runtime: Runtime, stop: Stop = None) -> int:
    """Send what is due in the outbox (for cron; `serve` also has a dispatcher thread).
    Returns the messages handled: sent, retried or failed."""
    mailer = make_mailer(runtime.settings)
    node = worker.node_name(runtime)
    total = 0
    while not stopped(stop):
        counts = dispatcher.dispatch_due(runtime, mailer, out=lambda _line: None, node=node,
                                         stop=stop, on_failure=notify.mail_failed)
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
    while taken < limit and not stopped(stop) and worker.run_once(runtime, node, outage):
        taken += 1
    if taken:
        log.info("spool: %d message(s) processed", taken)
    return taken


JOBS: dict[str, tuple[Callable[[Runtime], int], float]] = {
    # name: (function, interval in seconds)
    "expire": (jobs.expire_grants, 60.0),
    "remind": (jobs.remind_grants, 60.0),
    "expiry_summary": (jobs.report_expired, 60.0),
    "outbox": (dispatch_outbox, 60.0),
    "spool": (process_spool, 60.0),
    "purge": (purge.purge, 3600.0),
}


def run_job(runtime: Runtime, name: str, stop: Stop = None) -> int:
    """Run the job `name` once, timed and counted in the metrics (a run that raises counts as
    failed and raises on). On PostgreSQL a job runs on one node at a time: while another node
    runs it, this run is skipped (0)."""
    with locks.exclusive(runtime.db, f"job {name}") as ours:
        if not ours:
            log.debug("%s: running on another node; skipped", name)
            return 0
        return _run_job(runtime, name, stop)


def _run_job(runtime: Runtime, name: str, stop: Stop) -> int:
    function, _ = JOBS[name]
    started = time.monotonic()
    failed = True
    try:
        done = function(runtime, stop=stop)
        failed = False
    finally:
        runtime.metrics.job_ran(name, time.monotonic() - started, failed=failed)
    return done


# What a node without workers (`serve --no-worker`) leaves to the nodes that have them.
WORKER_JOBS = ("outbox", "spool")


def build_scheduler(runtime: Runtime, stop: threading.Event | None = None, *,
                    workers: bool = True) -> BackgroundScheduler:
    """The jobs on their intervals; `stop` ends a running job between batches. Without
    `workers`, the outbox and spool jobs are left out."""
    stop = stop if stop is not None else threading.Event()
    scheduler = BackgroundScheduler(timezone="UTC")
    for name, (_function, seconds) in JOBS.items():
        if not workers and name in WORKER_JOBS:
            continue
        guarded = functools.partial(_guarded, name, Outage(log, name), runtime, stop)
        # coalesce + a grace time: runs missed while the service was down happen once at start.
        scheduler.add_job(guarded, "interval", seconds=seconds, id=name, name=name,
                          coalesce=True, max_instances=1, misfire_grace_time=None,
                          next_run_time=runtime.clock())
    return scheduler


def _guarded(name: str, outage: Outage, runtime: Runtime,
             stop: threading.Event) -> int | None:
    """A run that meets a database or storage outage logs it once per outage (not a
    traceback a minute); the next run retries, on a fresh connection."""
    if stop.is_set():
        return None
    try:
        done = run_job(runtime, name, stop)
    except (*db.UNAVAILABLE, StorageError) as exc:
        outage.failed(cause_of(exc))
        return None
    finally:
        runtime.db.close()  # scheduler threads are pooled: do not keep a connection idle
    outage.ended()
    return done
