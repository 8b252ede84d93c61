"""Cluster-wide locks: a PostgreSQL advisory lock per name, so that a scheduled job runs on one
node at a time however many schedulers share the database (SQLite is one machine's database:
there the jobs' own state guards are enough)."""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import Iterator

import peewee

from mailbridge.store.db import UNAVAILABLE

log = logging.getLogger(__name__)

# The first half of every mailbridge advisory lock key ("mb"), so that other applications
# sharing the database server keep their own key space.
NAMESPACE = 0x6D62


def key(name: str) -> int:
    """A stable 32-bit signed key for `name` (the same on every node and Python version)."""
    return zlib.crc32(name.encode()) - 2 ** 31


@contextlib.contextmanager
def exclusive(db: peewee.Database, name: str) -> Iterator[bool]:
    """Yields True while this connection holds the lock `name`, False (at once, without
    waiting) when another session holds it. The lock is a session lock on the calling
    thread's connection: it ends with the block, or with the connection if that dies."""
    if not isinstance(db, peewee.PostgresqlDatabase):
        yield True
        return
    taken = db.execute_sql("SELECT pg_try_advisory_lock(%s, %s)",
                           (NAMESPACE, key(name))).fetchone()[0]
    if not taken:
        yield False
        return
    try:
        yield True
    finally:
        try:
            db.execute_sql("SELECT pg_advisory_unlock(%s, %s)", (NAMESPACE, key(name)))
        except UNAVAILABLE as exc:  # the connection is gone, and its locks with it
            log.debug("advisory unlock failed (%s)", type(exc).__name__)
