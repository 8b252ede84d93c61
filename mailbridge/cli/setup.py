"""Set-up commands: `init` and `db upgrade` / `db version`."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import click

from mailbridge.cli.context import Context, pass_ctx
from mailbridge.clock import system_clock
from mailbridge.store import schema
from mailbridge.store.blobs import create_master_key_file


@click.command()
@pass_ctx
def init(ctx: Context) -> None:
    """Create the data directory, the master key and the database schema."""
    settings = ctx.settings
    settings.service.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path = settings.master_key_path
    if not os.environ.get("MAILBRIDGE_MASTER_KEY"):
        key_path.parent.mkdir(parents=True, exist_ok=True)
        if create_master_key_file(key_path):
            click.echo(f"created master key {key_path} (back it up: documents cannot be "
                       "read without it)")
        else:
            click.echo(f"master key {key_path} already exists; kept")
    runtime = ctx.runtime
    applied = schema.upgrade(runtime.db, system_clock(), runtime)
    click.echo("database schema: " + (", ".join(applied) if applied else "already current"))
    tightened = make_private(settings.service.data_dir)
    if tightened:
        click.echo(f"data directory: made {tightened} file(s) and folder(s) private to this user")


def make_private(directory: Path) -> int:
    """The data directory 0700 with everything in it 0700 (folders) or 0600 (files), as an
    installation made before this rule, or copied with other modes, may not be. Returns how
    many modes were changed."""
    changed = 0
    for path in [directory, *directory.rglob("*")]:
        if path.is_symlink():
            continue
        wanted = 0o700 if path.is_dir() else 0o600
        if stat.S_IMODE(path.stat().st_mode) != wanted:
            path.chmod(wanted)
            changed += 1
    return changed


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@pass_ctx
def db_upgrade(ctx: Context) -> None:
    """Apply pending schema migrations."""
    applied = schema.upgrade(ctx.runtime.db, system_clock(), ctx.runtime)
    click.echo("applied: " + ", ".join(applied) if applied else "schema already current")


@db.command("version")
@pass_ctx
def db_version(ctx: Context) -> None:
    """Show the schema version."""
    click.echo(f"schema version {schema.current_version(ctx.runtime.db)} "
               f"(latest {schema.LATEST})")
