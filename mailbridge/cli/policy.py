"""`mailbridge policy`: the policy service for an MTA in front, alone — on a gateway that
relays to mailbridge elsewhere, or beside a `serve` run without it."""

from __future__ import annotations

import queue
import signal

import click

from mailbridge.cli.context import Context, pass_ctx
from mailbridge.receive.policy import PolicyListener
from mailbridge.service import listener


@click.command("policy")
@pass_ctx
def policy(ctx: Context) -> None:
    """Answer Postfix's policy queries on `[policy] host`/`port` until SIGTERM or Ctrl-C."""
    runtime = ctx.ready_runtime()
    settings = runtime.settings.policy
    service = PolicyListener(runtime)
    with listener("[policy] port", settings.host, settings.port):
        service.start()
    click.echo(f"policy service on {settings.host}:{service.port}")
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: signals.put(signum))
    signals.get()
    service.stop(runtime.settings.service.stop_timeout_seconds)
    runtime.db.close()
