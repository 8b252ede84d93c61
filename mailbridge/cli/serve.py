"""`mailbridge serve`: run every part of the service until SIGTERM or Ctrl-C; SIGHUP reloads
the SMTP TLS certificate."""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys

import click

from mailbridge.cli.context import Context, pass_ctx
from mailbridge.logs import configure_logging


@click.command()
@pass_ctx
def serve(ctx: Context) -> None:
    """Run SMTP intake, worker, outbound dispatcher, scheduler and web portal."""
    from mailbridge.outbound.mailer import is_loopback, phi_in_clear_refused
    from mailbridge.service import Service, raise_open_file_limit

    settings = ctx.settings
    configure_logging(settings.service.log_level)
    log = logging.getLogger("mailbridge")
    if not settings.senders.require_authentication:
        log.warning("!" * 72)
        log.warning("[senders] require_authentication = false: ANY message whose From is a "
                    "member's address is accepted without DKIM. For local demos only.")
        log.warning("!" * 72)
    relay = settings.outbound.smtp
    if settings.outbound.transport == "smtp" and phi_in_clear_refused(relay):
        log.warning("[outbound.smtp] tls = \"none\" and the relay %s is not on this machine: "
                    "receipts, notices and other mail carrying PHI are held (not sent, not "
                    "lost) until the relay is reached over TLS", relay.host)
    if settings.metrics.enabled and not is_loopback(settings.metrics.host):
        log.warning("[metrics] host = %s: /metrics answers anyone who reaches that address "
                    "(no authentication); let only your Prometheus server through",
                    settings.metrics.host)
    files, wanted = raise_open_file_limit(settings.web.connection_limit)
    if files < wanted:
        log.warning("[web] connection_limit = %d needs about %d open files, but this process "
                    "may open only %d (raise `ulimit -n` / LimitNOFILE)",
                    settings.web.connection_limit, wanted, files)
    service = Service(ctx.ready_runtime())
    # SimpleQueue.put is safe in a signal handler (no lock the interrupted code could hold).
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: signals.put(signum))
    service.start()
    tls = ""
    if service.certificate:
        tls = " (STARTTLS required)" if settings.smtp.require_tls else " (STARTTLS offered)"
    click.echo(f"mailbridge: SMTP intake on {settings.smtp.host}:{service.smtp_port} "
               f"for {settings.addresses.sharing}{tls}")
    if service.smtps:
        click.echo(f"mailbridge: SMTP intake with implicit TLS on {settings.smtp.host}:"
                   f"{settings.smtp.implicit_tls_port}")
    click.echo(f"mailbridge: portal on http://{settings.web.host}:{service.web_port}/ "
               f"(links use {settings.service.base_url})")
    if service.metrics_server:
        click.echo(f"mailbridge: metrics on http://{settings.metrics.host}:"
                   f"{service.metrics_port}/metrics")
    if settings.imap.enabled:
        click.echo(f"mailbridge: IMAP intake from the folder {settings.imap.folder} at "
                   f"{settings.imap.host}:{settings.imap.port}")
    if settings.outbound.transport == "maildir":
        click.echo(f"mailbridge: outbound mail is written to the Maildir "
                   f"{settings.outbound.maildir}")
    else:
        click.echo(f"mailbridge: outbound mail goes to the relay {relay.host}:{relay.port} "
                   f"(tls = {relay.tls_mode})")
    click.echo("mailbridge: running; stop with Ctrl-C", err=False)
    sys.stdout.flush()
    while signals.get() == signal.SIGHUP:
        service.reload_tls()
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
