"""Set-up commands: `init` and `db upgrade` / `db version`."""

from __future__ import annotations

import os

import click

from mailbridge import schema
from mailbridge.cli.context import Context, pass_ctx
from mailbridge.clock import system_clock
from mailbridge.storage import create_master_key_file


@click.command()
@pass_ctx
def init(ctx: Context) -> None:
    """Create the data directory, the master key and the database schema."""
    settings = ctx.settings
    settings.service.data_dir.mkdir(parents=True, exist_ok=True)
    key_path = settings.master_key_path
    if not os.environ.get("MAILBRIDGE_MASTER_KEY"):
        key_path.parent.mkdir(parents=True, exist_ok=True)
        if create_master_key_file(key_path):
            click.echo(f"created master key {key_path} (back it up: documents cannot be "
                       "read without it)")
        else:
            click.echo(f"master key {key_path} already exists; kept")
    runtime = ctx.runtime
    applied = schema.upgrade(runtime.db, system_clock())
    click.echo("database schema: " + (", ".join(applied) if applied else "already current"))


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@pass_ctx
def db_upgrade(ctx: Context) -> None:
    """Apply pending schema migrations."""
    applied = schema.upgrade(ctx.runtime.db, system_clock())
    click.echo("applied: " + ", ".join(applied) if applied else "schema already current")


@db.command("version")
@pass_ctx
def db_version(ctx: Context) -> None:
    """Show the schema version."""
    click.echo(f"schema version {schema.current_version(ctx.runtime.db)} "
               f"(latest {schema.LATEST})")
