"""Database and storage outages seen by one part of the service (worker, dispatcher, a job):
one WARNING when the trouble starts, one INFO when it ends — never one line per message or
per retry, nor one per worker process (`OutageBoard`) — and the capped back-off meanwhile."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mailbridge.store.blobs import StorageError, StorageFull

# (logger name, part, cause or "" once it ended, back-off cap in seconds): what a worker
# process tells its parent instead of logging the start or end of an outage itself.
Announce = Callable[[str, str, str, float], None]
WORKING_AGAIN = "%s: working again after %s (%.0f s)"


def _warn(log: logging.Logger, part: str, cause: str, max_seconds: float) -> None:
    log.warning("%s: %s; nothing is lost, work waits and is retried with back-off (up to %g s)",
                part, cause, max_seconds)


class Outage:
    def __init__(self, log: logging.Logger, part: str, *, base_seconds: float = 5.0,
                 max_seconds: float = 300.0, announce: Announce | None = None) -> None:
        self.log = log
        self.announce = announce  # None: this process logs its outages itself
        self.part = part
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds
        self._lock = threading.Lock()
        self._cause = ""
        self._since = 0.0

    @property
    def active(self) -> bool:
        return bool(self._cause)

    def failed(self, cause: str) -> float:
        """Record a failure (`cause` names the kind of trouble, never content); returns how
        long work hit by it should wait: the time the outage has lasted, at least
        `base_seconds` and at most `max_seconds`. Each retry thus comes about twice as late as
        the one before, however many messages wait."""
        with self._lock:
            now = time.monotonic()
            if cause != self._cause:
                if not self._cause:
                    self._since = now
                if self.announce is not None:
                    self.announce(self.log.name, self.part, cause, self.max_seconds)
                else:
                    _warn(self.log, self.part, cause, self.max_seconds)
                self._cause = cause
            return min(self.max_seconds, max(self.base_seconds, now - self._since))

    def ended(self) -> None:
        """Something worked again: log the end of the outage (once)."""
        if not self._cause:
            return
        with self._lock:
            if self._cause:
                if self.announce is not None:
                    self.announce(self.log.name, self.part, "", self.max_seconds)
                else:
                    self.log.info(WORKING_AGAIN, self.part, self._cause,
                                  time.monotonic() - self._since)
                self._cause = ""


class OutageBoard:
    """The outages the worker processes of one node announce, logged once for the node: the
    WARNING when the first process meets the trouble, the INFO when the last one in it is past
    it. A process that dies leaves without ending anything; if it was the last one in the
    outage, the outage is closed without a line (its successor warns again if the trouble
    is still there)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in: dict[tuple[str, str], dict[object, str]] = {}  # (logger, part): source: cause
        self._open: dict[tuple[str, str], tuple[str, float]] = {}  # (logger, part): cause, since

    def announce(self, source: object, logger: str, part: str, cause: str,
                 max_seconds: float) -> None:
        key = (logger, part)
        with self._lock:
            members = self._in.setdefault(key, {})
            if cause:
                members[source] = cause
                opened = self._open.get(key)
                if opened is None or opened[0] != cause:
                    _warn(logging.getLogger(logger), part, cause, max_seconds)
                    self._open[key] = (cause, opened[1] if opened else time.monotonic())
                return
            members.pop(source, None)
            if not members and key in self._open:
                was, since = self._open.pop(key)
                logging.getLogger(logger).info(WORKING_AGAIN, part, was,
                                               time.monotonic() - since)

    def gone(self, source: object) -> None:
        """`source` ended (whatever killed it)."""
        with self._lock:
            for key, members in self._in.items():
                if members.pop(source, None) is not None and not members:
                    self._open.pop(key, None)


def cause_of(exc: BaseException) -> str:
    """The kind of infrastructure trouble, for logs and `spool list` (no paths, no content)."""
    if isinstance(exc, StorageFull):
        return "storage full"
    if isinstance(exc, StorageError | OSError):
        return "storage unavailable"
    return "database unavailable"
