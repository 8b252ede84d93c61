"""`mailbridge backup DEST` and `mailbridge restore SRC`: a consistent copy of the data
directory while the service runs, and putting it back on a new machine — never the master
key, which the operator keeps safe separately."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import sys
from pathlib import Path

import click

from mailbridge import __version__
from mailbridge.cli.context import Context, pass_ctx
from mailbridge.clock import system_clock
from mailbridge.config import MASTER_KEY_ENV, read_master_key
from mailbridge.runtime import build_runtime, derive_key
from mailbridge.settings import Settings
from mailbridge.store import audit, backup, schema
from mailbridge.store.models import Document


def fingerprint(master_key: bytes) -> str:
    """Names the master key a backup needs without revealing anything about it."""
    return hmac.new(derive_key(master_key, "backup"), b"key fingerprint",
                    hashlib.sha256).hexdigest()[:16]


def blob_roots(settings: Settings) -> dict[str, Path]:
    return {"documents": settings.documents_dir, "spool": settings.spool_dir}


@contextlib.contextmanager
def progress_bar(total: int, label: str):
    """A progress bar on a terminal; nothing when the output goes to a file or a pipe."""
    if not sys.stderr.isatty():
        yield lambda _: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


@click.command("backup")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@pass_ctx
def backup_command(ctx: Context, dest: Path) -> None:
    """Write a consistent backup to DEST (a new or empty folder) while the service runs: the
    SQLite database (online backup), the encrypted documents and spool, and a manifest with
    checksums. Never the master key. On PostgreSQL, the blob files only: dump the database
    with pg_dump first (see the README); with [storage] backend = "database" the dump holds
    the documents too."""
    runtime = ctx.ready_runtime()
    settings = ctx.settings
    source = backup.Source(sqlite_path=settings.sqlite_path, blob_roots=blob_roots(settings))
    try:
        with progress_bar(backup.total_bytes(source), "backing up") as step:
            summary = backup.write_backup(
                source, dest, schema_version=schema.current_version(runtime.db),
                key_fingerprint=fingerprint(read_master_key(settings)), version=__version__,
                now=system_clock(), progress=step)
    except backup.BackupError as exc:
        raise click.BadParameter(str(exc), param_hint="DEST") from None
    click.echo(f"backup written to {dest}: {summary.files} file(s), "
               f"{summary.bytes / 1e6:.1f} MB")
    if summary.missing:
        click.echo(f"note: {len(summary.missing)} file(s) the database named were deleted by "
                   "the purge while the backup ran; nothing else is missing", err=True)
    if settings.sqlite_path is None and settings.storage.backend == "database":
        click.echo("the database is PostgreSQL and holds the documents and spool ([storage] "
                   "backend = \"database\"): this backup holds only files not moved there; "
                   "dump the database: pg_dump --format=custom --file=mailbridge.dump "
                   "<your [database] url>")
    elif settings.sqlite_path is None:
        click.echo("the database is PostgreSQL: this backup holds the documents and spool only;"
                   " dump the database too: pg_dump --format=custom --file=mailbridge.dump "
                   "<your [database] url>")
    click.echo(f"The master key is NOT in the backup. It is {_key_location(settings)}: back it "
               "up separately, somewhere else; without it nothing in the backup can be read.")


@click.command("restore")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@pass_ctx
def restore_command(ctx: Context, src: Path) -> None:
    """Restore a backup from SRC into the configured, empty data directory. The master key
    must already be in place ([service] master_key_file or MAILBRIDGE_MASTER_KEY). On
    PostgreSQL, restore the database with pg_restore first; this puts the blobs back."""
    settings = ctx.settings
    try:
        manifest = backup.read_manifest(src)
    except backup.BackupError as exc:
        raise click.BadParameter(str(exc), param_hint="SRC") from None
    master_key = read_master_key(settings)
    if manifest["key_fingerprint"] != fingerprint(master_key):
        raise click.BadParameter(
            "this backup was made with a different master key than the one configured "
            f"({_key_location(settings)})", param_hint="SRC")
    sqlite_path = settings.sqlite_path
    if (manifest["database"] == "sqlite") != (sqlite_path is not None):
        raise click.BadParameter(
            f"the backup's database is {manifest['database']} but [database] url is not",
            param_hint="SRC")
    roots = blob_roots(settings)
    try:
        backup.check_target(sqlite_path, roots)
        total = sum(e["bytes"] for e in manifest["files"])
        with progress_bar(total, "checking") as step:
            backup.check_files(src, manifest, step)
        with progress_bar(total, "restoring") as step:
            restored = backup.restore_files(src, manifest, sqlite_path, roots, step)
    except backup.BackupError as exc:
        raise click.BadParameter(str(exc), param_hint="SRC") from None
    runtime = build_runtime(settings, master_key=master_key)
    try:
        applied = schema.upgrade(runtime.db, system_clock(), runtime)
        verdict = audit.verify(runtime.audit_key)
        documents = Document.select().where(Document.blob_key != b"").count()
    finally:
        runtime.db.close()
    click.echo(f"restored {restored} file(s) from a backup of {manifest['created_at']}: "
               f"{documents} document(s)")
    for line in applied:
        click.echo(f"upgraded: {line}")
    if not verdict.ok:
        click.echo(f"audit trail broken at event id {verdict.event_id}: {verdict.problem}",
                   err=True)
        sys.exit(1)
    click.echo(f"audit trail intact: {verdict.checked} event(s) checked")


def _key_location(settings: Settings) -> str:
    if os.environ.get(MASTER_KEY_ENV):
        return f"in the environment ({MASTER_KEY_ENV})"
    return f"at {settings.master_key_path}"
