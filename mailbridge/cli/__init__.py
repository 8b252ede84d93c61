"""The `mailbridge` command: set up, serve, and manage members, shares and the spool."""

from __future__ import annotations

import os
import sys

import click

from mailbridge import __version__
from mailbridge.cli import (
    audit,
    backup,
    clinics,
    imap,
    jobs,
    members,
    policy,
    serve,
    setup,
    shares,
    spool,
    storage,
    worker,
)
from mailbridge.cli.context import Context, pass_ctx
from mailbridge.config import ConfigError

__all__ = ["DEFAULT_CONFIG", "Context", "cli", "main", "pass_ctx"]

DEFAULT_CONFIG = "config.toml"
PRIVATE_UMASK = 0o077


@click.group()
@click.version_option(version=__version__, prog_name="mailbridge")
@click.option("--config", "config_path", envvar="MAILBRIDGE_CONFIG", default=DEFAULT_CONFIG,
              show_default=True, help="Path to config.toml (or set MAILBRIDGE_CONFIG).")
@click.pass_context
def cli(ctx: click.Context, config_path: str) -> None:
    """mailbridge: share documents by e-mail through a secure portal."""
    ctx.obj = Context(config_path)


cli.add_command(setup.init)
cli.add_command(setup.db)
cli.add_command(serve.serve)
cli.add_command(worker.worker)
cli.add_command(policy.policy)
cli.add_command(audit.audit_group)
cli.add_command(backup.backup_command)
cli.add_command(backup.restore_command)
cli.add_command(clinics.clinics)
cli.add_command(members.members)
cli.add_command(shares.shares)
cli.add_command(spool.spool_group)
cli.add_command(jobs.jobs_group)
cli.add_command(imap.imap_group)
cli.add_command(storage.storage_group)


def main() -> None:
    # Everything the service writes (database, WAL, blobs, outbox) is for its own user only.
    os.umask(PRIVATE_UMASK)
    try:
        cli(standalone_mode=True)
    except ConfigError as exc:
        click.echo(f"mailbridge: configuration error: {exc}", err=True)
        sys.exit(2)
