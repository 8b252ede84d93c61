"""`mailbridge serve`: run every part of the service until SIGTERM or Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import click

from mailbridge.cli.context import Context, pass_ctx
from mailbridge.logs import configure_logging


@click.command()
@pass_ctx
def serve(ctx: Context) -> None:
    """Run SMTP intake, worker, outbound dispatcher, scheduler and web portal."""
    from mailbridge.service import Service

    settings = ctx.settings
    configure_logging(settings.service.log_level)
    log = logging.getLogger("mailbridge")
    if not settings.senders.require_authentication:
        log.warning("!" * 72)
        log.warning("[senders] require_authentication = false: ANY message whose From is a "
                    "member's address is accepted without DKIM. For local demos only.")
        log.warning("!" * 72)
    service = Service(ctx.ready_runtime())
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    service.start()
    click.echo(f"mailbridge: SMTP intake on {settings.smtp.host}:{service.smtp_port} "
               f"for {settings.addresses.sharing}")
    click.echo(f"mailbridge: portal on http://{settings.web.host}:{service.web_port}/ "
               f"(links use {settings.service.base_url})")
    if settings.imap.enabled:
        click.echo(f"mailbridge: IMAP intake from the folder {settings.imap.folder} at "
                   f"{settings.imap.host}:{settings.imap.port}")
    if settings.outbound.transport == "maildir":
        click.echo(f"mailbridge: outbound mail is written to the Maildir "
                   f"{settings.outbound.maildir}")
    else:
        relay = settings.outbound.smtp
        click.echo(f"mailbridge: outbound mail goes to the relay {relay.host}:{relay.port}")
    click.echo("mailbridge: running; stop with Ctrl-C", err=False)
    sys.stdout.flush()
    stop.wait()
    click.echo("mailbridge: stopping (no new mail accepted; finishing work in hand)")
    sys.stdout.flush()
    if service.stop():
        click.echo("mailbridge: stopped")
        return
    # Something is stuck (a relay or database not answering): leave anyway, as a crash would.
    # Rows still claimed are this node's and are resumed at its next start.
    click.echo(f"mailbridge: stopped after {settings.service.stop_timeout_seconds:g} s; work "
               "still in hand is resumed at the next start")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
