"""Schema versions: each migration is a function applied once, in order, by `db upgrade`."""

from __future__ import annotations

from collections.abc import Callable

import peewee

from mailbridge import models

V1_MODELS = [models.Clinic, models.Member, models.InboundMessage, models.Share,
             models.Document, models.Account, models.Grant, models.OutboundMessage,
             models.AuditEvent]


def _v1_initial(db: peewee.Database) -> None:
    db.create_tables(V1_MODELS)


def _v2_portal(db: peewee.Database) -> None:
    from playhouse.migrate import SchemaMigrator, migrate

    migrator = SchemaMigrator.from_database(db)
    if "archived_at" not in {c.name for c in db.get_columns("grant")}:
        migrate(migrator.add_column("grant", "archived_at", models.Grant.archived_at))
    db.create_tables([models.WebSession, models.OneTimeCode, models.PasswordReset])


def _v3_lifecycle(db: peewee.Database) -> None:
    from playhouse.migrate import SchemaMigrator, migrate

    migrator = SchemaMigrator.from_database(db)
    present = {c.name for c in db.get_columns("grant")}
    for name in ("reminded_at", "expiry_reported_at", "first_view_reported_at"):
        if name not in present:
            migrate(migrator.add_column("grant", name, getattr(models.Grant, name)))


def _v4_intake_origin(db: peewee.Database) -> None:
    from playhouse.migrate import SchemaMigrator, migrate

    migrator = SchemaMigrator.from_database(db)
    present = {c.name for c in db.get_columns("inbound_message")}
    for name in ("client_ip", "protocol"):
        if name not in present:
            migrate(migrator.add_column("inbound_message", name,
                                        getattr(models.InboundMessage, name)))
    # Version 1 creates tables from today's models, which already have the index.
    if "inbound_message_client_ip_received_at" not in {
            i.name for i in db.get_indexes("inbound_message")}:
        migrate(migrator.add_index("inbound_message", ("client_ip", "received_at"), False))


def _v5_blob_index(db: peewee.Database) -> None:
    from playhouse.migrate import SchemaMigrator, migrate

    # Version 1 creates tables from today's models, which already have the index.
    if "inbound_message_blob_id" not in {i.name for i in db.get_indexes("inbound_message")}:
        migrate(SchemaMigrator.from_database(db).add_index("inbound_message", ("blob_id",),
                                                           False))


MIGRATIONS: list[tuple[int, str, Callable[[peewee.Database], None]]] = [
    (1, "initial tables", _v1_initial),
    (2, "portal sessions, one-time codes, password resets, archived shares", _v2_portal),
    (3, "reminders and sender notifications on grants", _v3_lifecycle),
    (4, "where each inbound message came from (client IP, protocol)", _v4_intake_origin),
    (5, "an index on spooled messages' blob ids (orphaned-file sweep)", _v5_blob_index),
]
LATEST = MIGRATIONS[-1][0]


def current_version(db: peewee.Database) -> int:
    if not models.SchemaVersion.table_exists():
        return 0
    row = models.SchemaVersion.select(peewee.fn.MAX(models.SchemaVersion.version)).scalar()
    return row or 0


def upgrade(db: peewee.Database, now) -> list[str]:
    """Apply pending migrations; returns their descriptions. Safe to run repeatedly."""
    applied = []
    with db.atomic():
        db.create_tables([models.SchemaVersion], safe=True)
        version = current_version(db)
        for number, description, apply in MIGRATIONS:
            if number > version:
                apply(db)
                models.SchemaVersion.create(version=number, applied_at=now)
                applied.append(f"{number}: {description}")
    return applied
