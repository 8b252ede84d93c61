"""Schema versions: each migration is a function applied once, in order, by `db upgrade`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import peewee

from mailbridge.store import models

V1_MODELS = [models.Clinic, models.Member, models.InboundMessage, models.Share,
             models.Document, models.Account, models.Grant, models.OutboundMessage,
             models.AuditEvent]


def _v1_initial(db: peewee.Database, keys: Keys | None) -> None:
    db.create_tables(V1_MODELS)


def _v2_portal(db: peewee.Database, keys: Keys | None) -> None:
    from playhouse.migrate import SchemaMigrator, migrate

    migrator = SchemaMigrator.from_database(db)
    if "archived_at" not in {c.name for c in db.get_columns("grant")}:
        migrate(migrator.add_column("grant", "archived_at", models.Grant.archived_at))
    db.create_tables([models.WebSession, models.OneTimeCode, models.PasswordReset])


def _v3_lifecycle(db: peewee.Database, keys: Keys | None) -> None:
    from playhouse.migrate import SchemaMigrator, migrate

    migrator = SchemaMigrator.from_database(db)
    present = {c.name for c in db.get_columns("grant")}
    for name in ("reminded_at", "expiry_reported_at", "first_view_reported_at"):
        if name not in present:
            migrate(migrator.add_column("grant", name, getattr(models.Grant, name)))


def _v4_intake_origin(db: peewee.Database, keys: Keys | None) -> None:
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


def _v5_seen_messages(db: peewee.Database, keys: Keys | None) -> None:
    from playhouse.migrate import SchemaMigrator, migrate

    db.create_tables([models.SeenMessage], safe=True)
    if "inbound_message_envelope_from_received_at" not in {
            i.name for i in db.get_indexes("inbound_message")}:
        migrate(SchemaMigrator.from_database(db).add_index(
            "inbound_message", ("envelope_from", "received_at"), False))


def _v6_sealed_phi(db: peewee.Database, keys: Keys | None) -> None:
    """Titles, notes and file names move into sealed columns; tracebacks of failed messages
    too (their text may quote a message). The clear columns are dropped."""
    from playhouse.migrate import SchemaMigrator, migrate

    from mailbridge.store import sealed

    migrator = SchemaMigrator.from_database(db)
    for field in (models.Share.title_sealed, models.Share.note_sealed,
                  models.Document.name_sealed, models.InboundMessage.error_sealed):
        table = field.model._meta.table_name
        if field.column_name not in {c.name for c in db.get_columns(table)}:
            migrate(migrator.add_column(table, field.column_name, field))
    moves = ((models.Share, "title", "title_sealed", "title"),
             (models.Share, "note_html", "note_sealed", "note"),
             (models.Document, "filename", "name_sealed", "name"))
    for model, old, new, column in moves:
        table = model._meta.table_name
        if old not in {c.name for c in db.get_columns(table)}:
            continue
        rows = db.execute_sql(f'SELECT id, "{old}" FROM "{table}"').fetchall()  # noqa: S608
        for row_id, text in rows:
            if text:
                value = sealed.seal_text(_key(keys).phi_key, table, column, row_id, text)
                model.update({new: value}).where(model.id == row_id).execute()
        migrate(migrator.drop_column(table, old))
    failed = (models.InboundMessage.select(models.InboundMessage.id, models.InboundMessage.reason)
              .where(models.InboundMessage.reason.startswith("Traceback")))
    for row in failed:
        error = sealed.seal_text(_key(keys).phi_key, "inbound_message", "error", row.id, row.reason)
        (models.InboundMessage.update(
            error_sealed=error,
            reason=f"unexpected error; see `mailbridge spool show {row.id}`")
         .where(models.InboundMessage.id == row.id).execute())


class KeyNeeded(RuntimeError):
    """A migration must seal or chain existing rows and was given no keys."""


class Keys(Protocol):
    """The derived keys some migrations need (a Runtime has them)."""

    phi_key: bytes
    audit_key: bytes


def _key(keys: Keys | None) -> Keys:
    if keys is None:
        raise KeyNeeded("sealing or chaining existing rows needs the master key")
    return keys


def _v7_blob_index(db: peewee.Database, keys: Keys | None) -> None:
    from playhouse.migrate import SchemaMigrator, migrate

    # Version 1 creates tables from today's models, which already have the index.
    if "inbound_message_blob_id" not in {i.name for i in db.get_indexes("inbound_message")}:
        migrate(SchemaMigrator.from_database(db).add_index("inbound_message", ("blob_id",),
                                                           False))



def _v8_records(db: peewee.Database, keys: Keys | None) -> None:
    """Clinic policies, retention and legal holds, recipients removing a share, and the audit
    chain: existing events are linked in the order they were written."""
    from playhouse.migrate import SchemaMigrator, migrate

    from mailbridge.store import audit

    migrator = SchemaMigrator.from_database(db)
    new_columns = (
        models.Clinic.display_name, models.Clinic.contact, models.Clinic.claim_hours,
        models.Clinic.remind_before_hours, models.Clinic.document_retention_days,
        models.Clinic.legal_hold, models.Share.legal_hold, models.Share.purged_at,
        models.Grant.removed_at, models.AuditEvent.clinic)
    for field in new_columns:
        table = field.model._meta.table_name
        if field.column_name not in {c.name for c in db.get_columns(table)}:
            migrate(migrator.add_column(table, field.column_name, field))
    db.create_tables([models.AuditHead, models.AuditCheckpoint], safe=True)
    present = {c.name for c in db.get_columns("audit_event")}
    if "seq" not in present:
        migrate(migrator.add_column("audit_event", "seq", peewee.BigIntegerField(null=True)),
                migrator.add_column("audit_event", "mac", peewee.CharField(max_length=64,
                                                                             default="")))
        seq, mac = 0, ""
        for event in models.AuditEvent.select().order_by(models.AuditEvent.id):
            seq += 1
            row = {**audit.stored(event), "seq": seq}
            mac = audit.link(_key(keys).audit_key, mac, row)
            (models.AuditEvent.update(seq=seq, mac=mac)
             .where(models.AuditEvent.id == event.id).execute())
        migrate(migrator.add_index("audit_event", ("seq",), True))
        models.AuditHead.insert(id=1, seq=seq, mac=mac).on_conflict_ignore().execute()
    else:
        models.AuditHead.insert(id=1, seq=0, mac="").on_conflict_ignore().execute()


def _v9_staff(db: peewee.Database, keys: Keys | None) -> None:
    """The staff console: members' passwords, codes and passkeys, and member sessions."""
    from playhouse.migrate import SchemaMigrator, migrate

    db.create_tables([models.StaffAccount, models.StaffCode, models.StaffPasskey], safe=True)
    if "member_id" not in {c.name for c in db.get_columns("web_session")}:
        migrate(SchemaMigrator.from_database(db).add_column("web_session", "member_id",
                                                            models.WebSession.member))


def _v10_blobs_in_database(db: peewee.Database, keys: Keys | None) -> None:
    """Blobs kept in the database (`[storage] backend = "database"`)."""
    db.create_tables([models.Blob, models.BlobChunk], safe=True)
    if isinstance(db, peewee.PostgresqlDatabase):
        # Sealed records do not compress: skip TOAST's attempt and store them out of line.
        db.execute_sql("ALTER TABLE blob_chunk ALTER COLUMN data SET STORAGE EXTERNAL")


def _v11_access_requests(db: peewee.Database, keys: Keys | None) -> None:
    """Requests for access by someone a link was forwarded to."""
    db.create_tables([models.AccessRequest], safe=True)


def _v12_sent_back(db: peewee.Database, keys: Keys | None) -> None:
    """Documents recipients send back from their library, linked to the original share."""
    db.create_tables([models.SentBack], safe=True)


def _v13_watermark(db: peewee.Database, keys: Keys | None) -> None:
    """A clinic's own watermark setting (None: the configuration's)."""
    from playhouse.migrate import SchemaMigrator, migrate

    if "watermark" not in {c.name for c in db.get_columns("clinic")}:
        migrate(SchemaMigrator.from_database(db).add_column("clinic", "watermark",
                                                            models.Clinic.watermark))


# The full indexes the partial ones of version 14 replace.
SUPERSEDED_INDEXES = ("grant_state", "grant_deadline", "grant_account_id",
                      *(f"audit_event_{ref}_id" for ref in ("document", "member", "account",
                                                            "inbound", "clinic")))


def _v14_partial_indexes(db: peewee.Database, keys: Keys | None) -> None:
    """Bulk jobs write a million rows at a time: index only the rows queries look for."""
    for name in SUPERSEDED_INDEXES:
        db.execute_sql(f'DROP INDEX IF EXISTS "{name}"')
    for name, table, column, where in models.PARTIAL_INDEXES:
        db.execute_sql(f'CREATE INDEX IF NOT EXISTS "{name}" ON "{table}" ("{column}") '
                       f"WHERE {where}")


def _v15_audit_references(db: peewee.Database, keys: Keys | None) -> None:
    """Audit events refer to shares, grants and the rest by id alone (see `models.reference`).
    SQLite cannot drop a constraint without rebuilding the table, and mailbridge deletes none
    of the rows an event names, so an upgraded SQLite database keeps its inert ones."""
    if not isinstance(db, peewee.PostgresqlDatabase):
        return
    names = db.execute_sql("SELECT conname FROM pg_constraint WHERE contype = 'f' "
                           "AND conrelid = 'audit_event'::regclass").fetchall()
    for (name,) in names:
        db.execute_sql(f'ALTER TABLE "audit_event" DROP CONSTRAINT "{name}"')


MIGRATIONS: list[tuple[int, str, Callable[[peewee.Database, Keys | None], None]]] = [
    (1, "initial tables", _v1_initial),
    (2, "portal sessions, one-time codes, password resets, archived shares", _v2_portal),
    (3, "reminders and sender notifications on grants", _v3_lifecycle),
    (4, "where each inbound message came from (client IP, protocol)", _v4_intake_origin),
    (5, "members' messages acted on (a replay is refused by the database); per-sender budgets",
     _v5_seen_messages),
    (6, "titles, notes, file names and error text sealed (PHI at rest)", _v6_sealed_phi),
    (7, "an index on spooled messages' blob ids (orphaned-file sweep)", _v7_blob_index),
    (8, "clinic policies, retention, legal holds and the audit chain", _v8_records),
    (9, "the staff console: members' passwords, codes, passkeys and sessions", _v9_staff),
    (10, "encrypted blobs kept in the database (shared document storage)",
     _v10_blobs_in_database),
    (11, "access requests from forwarded links", _v11_access_requests),
    (12, "documents sent back by recipients, linked to the original share", _v12_sent_back),
    (13, "a clinic's own watermark setting", _v13_watermark),
    (14, "partial indexes for the set-based jobs (pending and unreported grants, references "
         "that are mostly empty)", _v14_partial_indexes),
    (15, "audit events refer to rows by id, without foreign-key constraints",
     _v15_audit_references),
]
LATEST = MIGRATIONS[-1][0]


def current_version(db: peewee.Database) -> int:
    if not models.SchemaVersion.table_exists():
        return 0
    row = models.SchemaVersion.select(peewee.fn.MAX(models.SchemaVersion.version)).scalar()
    return row or 0


def upgrade(db: peewee.Database, now, keys: Keys | None = None) -> list[str]:
    """Apply pending migrations; returns their descriptions. Safe to run repeatedly.
    `keys` (a Runtime) are needed when existing rows must be sealed or chained."""
    applied = []
    with db.atomic():
        db.create_tables([models.SchemaVersion], safe=True)
        version = current_version(db)
        for number, description, apply in MIGRATIONS:
            if number > version:
                apply(db, keys)
                models.SchemaVersion.create(version=number, applied_at=now)
                applied.append(f"{number}: {description}")
    if applied and isinstance(db, peewee.SqliteDatabase):
        # Values just sealed must not linger in clear in the write-ahead log.
        db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    return applied
