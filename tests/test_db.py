"""Database binding and schema versions, on SQLite and PostgreSQL."""

from __future__ import annotations

from mailbridge import schema
from mailbridge.clock import system_clock
from mailbridge.db import is_postgres, open_database
from mailbridge.models import Clinic


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
    assert not is_postgres(db)
    assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute_sql("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    db.close()


def test_upgrade_from_version_1_adds_the_portal_tables(tmp_path):
    from mailbridge import models

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
