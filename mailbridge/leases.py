"""Keeping a claim alive. While a node holds queued rows (a message being processed, e-mails
being sent) a heartbeat renews their lease every third of its length, so the lease can be
short: a crashed node's work is taken over within about one lease, while slow work in hand
is never taken over by another node."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Iterable, Iterator

import peewee

from mailbridge import db
from mailbridge.runtime import Runtime

log = logging.getLogger(__name__)


@contextlib.contextmanager
def kept(runtime: Runtime, model: type[peewee.Model], ids: Iterable[int], node: str,
         state: str) -> Iterator[None]:
    """Renew the lease of `ids` (rows of `model` in `state` claimed by `node`) until the block
    ends. Renewal runs in its own thread, with its own database connection when it needs one."""
    done = threading.Event()
    thread = threading.Thread(target=_renew, args=(runtime, model, list(ids), node, state, done),
                              name="lease-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(1.0)  # a renewal stuck on a dead database must not hold the caller


def renew(runtime: Runtime, model: type[peewee.Model], ids: list[int], node: str,
          state: str) -> int:
    until = runtime.clock() + dt.timedelta(seconds=runtime.settings.worker.lease_seconds)
    return (model.update(lease_until=until)
            .where(model.id.in_(ids) & (model.claimed_by == node) & (model.state == state))
            .execute())


def _renew(runtime: Runtime, model: type[peewee.Model], ids: list[int], node: str, state: str,
           done: threading.Event) -> None:
    interval = runtime.settings.worker.lease_seconds / 3
    try:
        while not done.wait(interval):
            try:
                renew(runtime, model, ids, node, state)
            except db.UNAVAILABLE as exc:  # the holder meets the same outage and says so
                log.debug("lease renewal failed (%s)", type(exc).__name__)
    finally:
        runtime.db.close()  # this thread's connection, if it opened one
