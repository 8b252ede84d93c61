"""Scheduled jobs: plain, idempotent functions that log what they did, and their wiring into
APScheduler inside `mailbridge serve`."""

from __future__ import annotations

import logging
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler

from mailbridge import audit
from mailbridge.models import Grant
from mailbridge.runtime import Runtime

log = logging.getLogger(__name__)


def expire_grants(runtime: Runtime, batch: int = 500) -> int:
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
        if len(due) < batch:
            break
    if total:
        log.info("expire: %d grant(s) expired", total)
    return total


JOBS: dict[str, tuple[Callable[[Runtime], int], float]] = {
    # name: (function, interval in seconds)
    "expire": (expire_grants, 60.0),
}


def build_scheduler(runtime: Runtime) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(timezone="UTC")
    for name, (function, seconds) in JOBS.items():
        # coalesce + a grace time: runs missed while the service was down happen once at start.
        scheduler.add_job(function, "interval", args=[runtime], seconds=seconds, id=name,
                          coalesce=True, max_instances=1, misfire_grace_time=None,
                          next_run_time=runtime.clock())
    return scheduler
