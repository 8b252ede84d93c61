"""Opens the database named by `[database] url` and binds the models to it.

SQLite runs in WAL mode with a busy timeout and IMMEDIATE write transactions, so the SMTP
threads, the worker and the web server can share one file; PostgreSQL uses the same code.
A PostgreSQL connection that died (server restart, failover, a pooler's idle timeout,
`pg_terminate_backend`) is dropped before its thread uses it again, so every thread recovers
by itself: the statement that met the dead connection fails once, the next one reconnects.
"""

from __future__ import annotations

import threading
from pathlib import Path

import peewee
from playhouse.db_url import parse

from mailbridge.store import models

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "foreign_keys": 1,
    "busy_timeout": 5000,
    "synchronous": "full",  # a 250 must survive power loss, not only a crash
    "secure_delete": 1,  # deleted or replaced values (PHI) are overwritten, not left in free pages
}

# Errors that mean "the database is not usable right now" (locked, gone, connection lost):
# the caller answers 451 or retries later.
UNAVAILABLE = (peewee.DatabaseError, peewee.InterfaceError)
# The narrower part of that which is the service's trouble, not the message's (locked, full,
# unreachable, connection lost): a message hit by it waits without using up its attempts.
# Integrity and programming errors are not in it: retrying would not cure them.
INFRASTRUCTURE = (peewee.OperationalError, peewee.InterfaceError)
WRITER_WAIT_SECONDS = 5.0  # as long as SQLite's busy_timeout


class RecoveringPostgresqlDatabase(peewee.PostgresqlDatabase):
    """Replaces a dead connection by itself, so no thread needs to remember to.

    Outside a transaction, a BEGIN or a SELECT that meets a dead connection is sent once more
    on a new one (nothing ran on the dead one: a connection killed while idle is only found
    dead when used). Any other statement fails (the caller answers 451 or retries later) and
    the next one reconnects. Inside a transaction nothing is repeated: every statement fails
    until the transaction ends, and a COMMIT that finds the connection dead raises instead of
    committing nothing on a new connection.
    """

    def cursor(self, named_cursor=None):
        if not self._state.transactions:
            self._drop_if_dead()
        return super().cursor(named_cursor)

    def execute_sql(self, sql, params=None):
        try:
            return super().execute_sql(sql, params)
        except INFRASTRUCTURE:
            repeatable = sql.lstrip()[:6].upper() == "SELECT"
            if self._state.transactions or not repeatable or not self._drop_if_dead():
                raise
        return super().execute_sql(sql, params)

    def begin(self, isolation_level=None):
        try:
            return super().begin(isolation_level)
        except INFRASTRUCTURE:
            if not self._drop_if_dead():
                raise
        return super().begin(isolation_level)

    def commit(self):
        # peewee pops the transaction before committing, so `cursor` would reconnect here and
        # "commit" an empty transaction on the new connection: the work would be lost silently.
        if self._drop_if_dead():
            raise peewee.InterfaceError("connection lost before COMMIT; nothing was committed")
        return super().commit()

    def _drop_if_dead(self) -> bool:
        conn = self._state.conn
        if self._state.closed or conn is None or not _connection_dead(conn):
            return False
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - it is dead already; closing is a courtesy
            pass
        self._state.reset()
        return True


class SerializedSqliteDatabase(peewee.SqliteDatabase):
    """SQLite with this process's write transactions taking turns on a lock of our own.

    SQLite lets one writer in at a time; a second BEGIN IMMEDIATE finds the file locked and
    SQLite's busy handler then *sleeps* (1, 2, 5, 10 ms and more) before trying again, long
    after the first writer committed. Threads of one process (portal requests auditing each
    download, SMTP sessions, the worker) instead wait on a lock that wakes the next one the
    moment the transaction ends. Other processes still meet SQLite's own locking; a lock not
    released in time (a transaction left open) is waited for at most `busy_timeout`, after
    which SQLite's locking decides as before.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._writer = threading.Lock()
        self._holder = threading.local()

    def begin(self, lock_type=None):
        if not getattr(self._holder, "held", False):
            self._holder.held = self._writer.acquire(timeout=WRITER_WAIT_SECONDS)
        try:
            super().begin(lock_type)
        except BaseException:
            self._release()
            raise

    def commit(self):
        try:
            super().commit()
        finally:
            self._release()

    def rollback(self):
        try:
            super().rollback()
        finally:
            self._release()

    def _close(self, conn):
        self._release()  # a connection closed inside a transaction ends it
        super()._close(conn)

    def _release(self) -> None:
        if getattr(self._holder, "held", False):
            self._holder.held = False
            self._writer.release()


def _connection_dead(conn) -> bool:
    import psycopg2.extensions

    if conn.closed:  # psycopg2 sets it when it finds the server gone
        return True
    return conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN


def open_database(url: str) -> peewee.Database:
    """Connect lazily to `url` and bind every model to the result."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = SerializedSqliteDatabase(path, pragmas=SQLITE_PRAGMAS, timeout=5,
                                   lock_type="IMMEDIATE", check_same_thread=False)
    else:
        db = RecoveringPostgresqlDatabase(**parse(url.replace("postgres://", "postgresql://", 1)),
                                          autoconnect=True)
    db.bind(models.ALL_MODELS, bind_refs=False, bind_backrefs=False)
    return db
