"""`mailbridge storage`: where the encrypted documents and spooled messages are kept, and
moving them between the local folders and the database."""

from __future__ import annotations

import click

from mailbridge.cli.backup import progress_bar
from mailbridge.cli.context import Context, pass_ctx
from mailbridge.config import read_master_key
from mailbridge.logs import configure_logging
from mailbridge.runtime import derive_key, single_blob_store
from mailbridge.store import blob_migrate
from mailbridge.store.blob_format import StorageError

STORES = ("documents", "spool")
WHERE = {"database": "the database", "local": "the data directory"}


@click.group("storage")
def storage_group() -> None:
    """Where documents and spooled messages are kept ([storage] backend)."""


@storage_group.command("migrate")
@click.option("--to", "to", type=click.Choice(["database", "local"]), required=True,
              help="The backend to move every blob to.")
@pass_ctx
def storage_migrate(ctx: Context, to: str) -> None:
    """Move every document and spooled message to the `--to` backend, still encrypted: each
    blob is copied, read back and compared, and only then deleted from the other backend. Safe
    while the service runs (a blob not moved yet is read from where it is) and on several
    nodes; interrupted, run it again to go on."""
    runtime = ctx.ready_runtime()
    configure_logging(ctx.settings.service.log_level)
    settings = ctx.settings
    master_key = read_master_key(settings)
    source_backend = "local" if to == "database" else "database"
    pairs = []
    for name in STORES:
        key = derive_key(master_key, name)
        source = single_blob_store(settings, runtime.db, name, key, source_backend)
        target = single_blob_store(settings, runtime.db, name, key, to)
        pairs.append((name, source, target, list(source.blob_ids())))
    total = sum(len(ids) for *_, ids in pairs)
    try:
        with progress_bar(total, f"moving to {WHERE[to]}") as step:
            done = blob_migrate.move_all(pairs, step)
    except StorageError as exc:
        raise click.ClickException(f"{exc}; run the command again to go on") from None
    finally:
        runtime.db.close()
    for name, tally in done.items():
        counts = tally.counts
        click.echo(f"{name}: {counts[blob_migrate.MOVED]} moved to {WHERE[to]}, "
                   f"{counts[blob_migrate.ALREADY]} already there, "
                   f"{counts[blob_migrate.GONE]} deleted meanwhile")
    if settings.storage.backend != to:
        click.echo(f'[storage] backend is "{settings.storage.backend}": set it to "{to}" and '
                   "restart, then run this again to move what was stored meanwhile")
