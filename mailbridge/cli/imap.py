"""`mailbridge imap`: check the configured mailbox, or poll it without the rest of `serve`."""

from __future__ import annotations

import signal
import sys
import threading

import click

from mailbridge.cli.context import Context, pass_ctx
from mailbridge.logs import configure_logging


@click.group("imap")
def imap_group() -> None:
    """Intake from an existing mailbox ([imap] in the configuration)."""


@imap_group.command("check")
@pass_ctx
def imap_check(ctx: Context) -> None:
    """Connect, list capabilities, count waiting messages, create the processed/failed folders."""
    from mailbridge.receive.imap import check
    from mailbridge.receive.imap_session import ImapProblem

    imap = ctx.settings.imap
    try:
        report = check(ctx.settings)
    except ImapProblem as exc:
        click.echo(f"mailbridge imap check: {exc}", err=True)
        sys.exit(1)
    how = ("" if imap.auth != "xoauth2" else
           f", XOAUTH2 with a token from {imap.oauth_provider.capitalize()}")
    click.echo(f"connected to {imap.host}:{imap.port} ({imap.security}{how}) as "
               f"{imap.username}")
    click.echo("capabilities: " + " ".join(report.capabilities))
    click.echo(f"{report.folders.watch}: {report.waiting} message(s) waiting")
    for name in report.created:
        click.echo(f"created folder {name}")
    click.echo(f"processed messages go to {report.folders.processed}, messages from "
               f"non-members and unreadable ones to {report.folders.failed}")
    for warning in report.warnings:
        click.echo(f"warning: {warning}")
    if not imap.enabled:
        click.echo("note: [imap] enabled = false, so `mailbridge serve` does not watch it yet")


@imap_group.command("poll")
@click.option("--once", is_flag=True, help="Take what is waiting now, then exit.")
@pass_ctx
def imap_poll(ctx: Context, once: bool) -> None:
    """Spool the mailbox's messages (intake only; `serve` processes the spool)."""
    from mailbridge.receive.imap import ImapPoller, poll_once
    from mailbridge.receive.imap_session import ImapProblem

    runtime = ctx.ready_runtime()
    configure_logging(ctx.settings.service.log_level)
    if once:
        try:
            stats = poll_once(runtime)
        except ImapProblem as exc:
            click.echo(f"mailbridge imap poll: {exc}", err=True)
            sys.exit(1)
        click.echo(f"mailbridge imap poll: {stats.summary()}")
        return
    poller = ImapPoller(runtime)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    poller.start()
    click.echo(f"mailbridge: watching {ctx.settings.imap.folder} at "
               f"{ctx.settings.imap.host}:{ctx.settings.imap.port}; stop with Ctrl-C")
    sys.stdout.flush()
    stop.wait()
    poller.stop()
    click.echo("mailbridge: stopped")
