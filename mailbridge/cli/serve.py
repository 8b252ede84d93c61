"""`mailbridge serve`: run every part of the service (or the roles not left out) until SIGTERM
or Ctrl-C; SIGHUP reloads the SMTP TLS certificate."""

from __future__ import annotations

import faulthandler
import logging
import os
import queue
import signal
import sys

import click

from mailbridge.cli.context import Context, pass_ctx
from mailbridge.logs import configure_logging


@click.command()
@click.option("--no-smtp", is_flag=True,
              help="No intake here: no SMTP listener (nor LMTP, policy service, IMAP poller).")
@click.option("--no-worker", is_flag=True,
              help="No workers here (spool worker and outbox dispatcher): another node's "
                   "`mailbridge worker` or `serve` processes the mail.")
@click.option("--no-web", is_flag=True, help="No portal here (e.g. it runs under gunicorn).")
@click.option("--no-scheduler", is_flag=True,
              help="No scheduled jobs here (expiry, reminders, summaries, purge).")
@click.option("--processes", type=click.IntRange(0, 256), default=None,
              help="Worker processes; default [worker] processes (0: threads in this process).")
@pass_ctx
def serve(ctx: Context, no_smtp: bool, no_worker: bool, no_web: bool, no_scheduler: bool,
          processes: int | None) -> None:
    """Run SMTP intake, workers (spool and outbound dispatcher), scheduler and web portal."""
    from mailbridge.service import Service

    settings = ctx.settings
    configure_logging(settings.service.log_level)
    if no_smtp and no_worker and no_web and no_scheduler:
        raise click.UsageError("every role is left out: nothing to run")
    count = settings.worker.processes if processes is None else processes
    service = Service(ctx.ready_runtime(), smtp=not no_smtp, worker=not no_worker,
                      web=not no_web, scheduler=not no_scheduler, processes=count)
    run_until_stopped(settings, service)


def run_until_stopped(settings, service) -> None:
    """Start `service`, say what runs where, and stop it on SIGTERM or Ctrl-C."""
    from mailbridge.outbound.mailer import is_loopback, phi_in_clear_refused
    from mailbridge.service import raise_open_file_limit

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
    # What a stop (or anything else) is stuck on: `kill -USR1` prints every thread's stack
    # (names and lines, no values) to stderr, without stopping anything.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # SimpleQueue.put is safe in a signal handler (no lock the interrupted code could hold).
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: signals.put(signum))
    service.start()
    tls = ""
    if service.certificate:
        tls = " (STARTTLS required)" if settings.smtp.require_tls else " (STARTTLS offered)"
    if service.smtp:
        click.echo(f"mailbridge: SMTP intake on {settings.smtp.host}:{service.smtp_port} "
                   f"for {settings.addresses.sharing}{tls}")
    if service.smtps:
        click.echo(f"mailbridge: SMTP intake with implicit TLS on {settings.smtp.host}:"
                   f"{settings.smtp.implicit_tls_port}")
    if service.web:
        click.echo(f"mailbridge: portal on http://{settings.web.host}:{service.web_port}/ "
                   f"(links use {settings.service.base_url})")
    if service.processes:
        click.echo(f"mailbridge: {len(service.processes.ids)} worker process(es) "
                   f"(pids {' '.join(map(str, service.processes.pids()))})")
    elif service.worker:
        click.echo("mailbridge: worker and outbound dispatcher in this process")
    if not service.scheduler:
        click.echo("mailbridge: no scheduled jobs here")
    if service.metrics_server:
        click.echo(f"mailbridge: metrics on http://{settings.metrics.host}:"
                   f"{service.metrics_port}/metrics")
    if service.imap:
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
