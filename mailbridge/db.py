"""Opens the database named by `[database] url` and binds the models to it.

SQLite runs in WAL mode with a busy timeout and IMMEDIATE write transactions, so the SMTP
threads, the worker and the web server can share one file; PostgreSQL uses the same code.
"""

from __future__ import annotations

from pathlib import Path

import peewee
from playhouse.db_url import connect

from mailbridge import models

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


def open_database(url: str) -> peewee.Database:
    """Connect lazily to `url` and bind every model to the result."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = peewee.SqliteDatabase(path, pragmas=SQLITE_PRAGMAS, timeout=5,
                                   lock_type="IMMEDIATE", check_same_thread=False)
    else:
        db = connect(url.replace("postgres://", "postgresql://", 1), autoconnect=True)
    db.bind(models.ALL_MODELS, bind_refs=False, bind_backrefs=False)
    return db


def is_postgres(db: peewee.Database) -> bool:
    return isinstance(db, peewee.PostgresqlDatabase)


def reset_connection(db: peewee.Database) -> None:
    """After a database error, drop this thread's connection so the next use reconnects."""
    try:
        if not db.is_closed():
            db.close()
    except Exception:  # a broken connection may fail to close; that is fine
        pass
