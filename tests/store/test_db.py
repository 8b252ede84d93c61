"""Database binding and schema versions, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import peewee
import pytest

from mailbridge.clock import system_clock
from mailbridge.store import schema
from mailbridge.store.db import INFRASTRUCTURE, open_database
from mailbridge.store.models import Clinic


def test_schema_upgrade_is_idempotent_and_versioned(db_url):
    db = open_database(db_url)
    assert schema.current_version(db) == 0
    applied = schema.upgrade(db, system_clock())
    assert applied == [f"{n}: {d}" for n, d, _ in schema.MIGRATIONS]
    assert schema.current_version(db) == schema.LATEST
    assert schema.upgrade(db, system_clock()) == []
    Clinic.create(name="Riverside PT", created_at=system_clock())
    assert Clinic.select().count() == 1
    db.close()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path):
    db = open_database(f"sqlite:///{tmp_path / 'x' / 'mb.db'}")
    assert isinstance(db, peewee.SqliteDatabase)
    assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute_sql("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    db.close()


def test_upgrade_from_version_1_adds_the_portal_tables(tmp_path):
    from mailbridge.store import models

    db = open_database(f"sqlite:///{tmp_path / 'v1.db'}")
    db.create_tables([models.SchemaVersion, *schema.V1_MODELS])
    for column in ("archived_at", "reminded_at", "expiry_reported_at", "first_view_reported_at"):
        db.execute_sql(f'ALTER TABLE "grant" DROP COLUMN {column}')  # as version 1 made it
    models.SchemaVersion.create(version=1, applied_at=system_clock())
    assert schema.current_version(db) == 1
    assert not models.WebSession.table_exists()
    assert schema.upgrade(db, system_clock()) == [f"{n}: {d}" for n, d, _ in schema.MIGRATIONS[1:]]
    assert {"archived_at", "reminded_at"} <= {c.name for c in db.get_columns("grant")}
    assert models.WebSession.table_exists() and models.OneTimeCode.table_exists()
    db.close()


# --- a PostgreSQL connection that dies -------------------------------------------------------


@pytest.fixture
def pg(postgres_url):
    from playhouse.db_url import connect

    from tests.conftest import PG_ADMIN_URL

    db = open_database(postgres_url)
    db.execute_sql("DROP TABLE IF EXISTS probe")
    db.execute_sql("CREATE TABLE probe (x integer)")
    admin = connect(PG_ADMIN_URL)
    name = postgres_url.rsplit("/", 1)[1]

    def cut() -> None:
        """What a failover, a restart or a pooler's idle timeout does to our connections."""
        admin.execute_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))

    yield db, cut
    db.close()
    admin.close()


def rows(db) -> int:
    return db.execute_sql("SELECT count(*) FROM probe").fetchone()[0]


def test_a_read_on_a_cut_connection_is_answered_on_a_new_one(pg):
    db, cut = pg
    cut()
    assert rows(db) == 0  # nothing ran on the dead connection, so it is asked again


def test_a_write_on_a_cut_connection_fails_once_then_the_thread_reconnects(pg):
    db, cut = pg
    cut()
    with pytest.raises(INFRASTRUCTURE):  # it may or may not have run: never repeated
        db.execute_sql("INSERT INTO probe VALUES (1)")
    db.execute_sql("INSERT INTO probe VALUES (2)")
    assert rows(db) == 1


def test_a_transaction_begun_on_a_cut_connection_runs_on_a_new_one(pg):
    db, cut = pg
    cut()
    with db.atomic():
        db.execute_sql("INSERT INTO probe VALUES (1)")
    assert rows(db) == 1


def test_a_connection_cut_inside_a_transaction_fails_it_and_commits_nothing(pg):
    db, cut = pg
    with pytest.raises(INFRASTRUCTURE), db.atomic():
        db.execute_sql("INSERT INTO probe VALUES (1)")
        cut()
        db.execute_sql("INSERT INTO probe VALUES (2)")
    assert not db.in_transaction()
    assert rows(db) == 0


def test_a_commit_that_finds_the_connection_dead_raises_instead_of_committing_nothing(pg):
    db, cut = pg
    with pytest.raises(INFRASTRUCTURE), db.atomic():
        db.execute_sql("INSERT INTO probe VALUES (1)")
        cut()
        # The driver learns of the cut only when it next talks to the server.
        with pytest.raises(INFRASTRUCTURE):
            db.execute_sql("SELECT 1")
    assert rows(db) == 0


def test_every_thread_recovers_by_itself(pg):
    db, cut = pg
    results: list[int] = []

    def use_twice(cut_between: threading.Barrier) -> None:
        rows(db)  # this thread's own connection
        cut_between.wait()
        cut_between.wait()
        results.append(rows(db))
        db.close()

    barrier = threading.Barrier(4)
    threads = [threading.Thread(target=use_twice, args=(barrier,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    barrier.wait()
    cut()
    barrier.wait()
    for thread in threads:
        thread.join(10)
    assert results == [0, 0, 0]


def test_sqlite_writers_of_one_process_take_turns_and_a_failed_one_lets_go(tmp_path):
    """Threads writing at once all commit (none meets "database is locked"); a transaction
    that fails, or whose connection is closed inside it, does not hold up the next writer."""
    import time

    db = open_database(f"sqlite:///{tmp_path / 'mb.db'}")
    schema.upgrade(db, system_clock())
    clinic = Clinic.create(name="Riverside PT", timezone="UTC", created_at=system_clock())
    errors = []

    def write(n: int) -> None:
        try:
            for _ in range(n):
                with db.atomic():
                    current = Clinic.get_by_id(clinic.id).claim_hours or 0
                    Clinic.update(claim_hours=current + 1).where(Clinic.id == clinic.id).execute()
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=write, args=(40,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and Clinic.get_by_id(clinic.id).claim_hours == 240

    with pytest.raises(ZeroDivisionError), db.atomic():
        Clinic.update(claim_hours=0).execute()
        1 / 0  # noqa: B018
    db.begin()  # left open, then the connection is closed: the transaction ends with it
    db.close()
    started = time.monotonic()
    other = threading.Thread(target=write, args=(1,))
    other.start()
    other.join()
    assert errors == [] and time.monotonic() - started < 2.5  # no wait for a stale lock
    assert Clinic.get_by_id(clinic.id).claim_hours == 241
    db.close()
