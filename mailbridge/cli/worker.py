"""`mailbridge worker`: workers alone (spool worker and outbox dispatcher in `[worker]
processes` processes), for a machine that adds processing to a cluster on PostgreSQL."""

from __future__ import annotations

import click

from mailbridge.cli.context import Context, pass_ctx
from mailbridge.logs import configure_logging


@click.command()
@click.option("--processes", type=click.IntRange(0, 256), default=None,
              help="Worker processes; default [worker] processes (0: threads in this process).")
@pass_ctx
def worker(ctx: Context, processes: int | None) -> None:
    """Process spooled mail and send the outbox, with no listener and no scheduled jobs.

    Several `worker` commands on one machine need their own `[service] node_id` each
    (MAILBRIDGE_SERVICE_NODE_ID; the systemd template unit sets one per instance)."""
    from mailbridge.cli.serve import run_until_stopped
    from mailbridge.service import Service

    settings = ctx.settings
    configure_logging(settings.service.log_level)
    count = settings.worker.processes if processes is None else processes
    service = Service(ctx.ready_runtime(), smtp=False, web=False, scheduler=False,
                      processes=count, role="worker")
    run_until_stopped(settings, service)
