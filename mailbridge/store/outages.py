"""Database and storage outages seen by one part of the service (worker, dispatcher, a job):
one WARNING when the trouble starts, one INFO when it ends — never one line per message or
per retry — and the capped back-off to wait meanwhile."""

from __future__ import annotations

import logging
import threading
import time

from mailbridge.store.blobs import StorageError, StorageFull


class Outage:
    def __init__(self, log: logging.Logger, part: str, *, base_seconds: float = 5.0,
                 max_seconds: float = 300.0) -> None:
        self.log = log
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
                self.log.warning("%s: %s; nothing is lost, work waits and is retried with "
                                 "back-off (up to %g s)", self.part, cause, self.max_seconds)
                self._cause = cause
            return min(self.max_seconds, max(self.base_seconds, now - self._since))

    def ended(self) -> None:
        """Something worked again: log the end of the outage (once)."""
        if not self._cause:
            return
        with self._lock:
            if self._cause:
                self.log.info("%s: working again after %s (%.0f s)", self.part, self._cause,
                              time.monotonic() - self._since)
                self._cause = ""


def cause_of(exc: BaseException) -> str:
    """The kind of infrastructure trouble, for logs and `spool list` (no paths, no content)."""
    if isinstance(exc, StorageFull):
        return "storage full"
    if isinstance(exc, StorageError | OSError):
        return "storage unavailable"
    return "database unavailable"
