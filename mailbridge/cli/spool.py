"""`mailbridge spool`: list inbound messages and re-queue failed ones."""

from __future__ import annotations

import click

from mailbridge.cli.context import Context, pass_ctx
from mailbridge.receive import spool
from mailbridge.store import sealed
from mailbridge.store.models import InboundMessage
from mailbridge.store.states import Inbound


@click.group("spool")
def spool_group() -> None:
    """Inbound messages."""


@spool_group.command("list")
@click.option("--state", type=click.Choice([s.value for s in Inbound] + ["all"]), default="all",
              show_default=True)
@click.option("--limit", default=50, show_default=True)
@pass_ctx
def spool_list(ctx: Context, state: str, limit: int) -> None:
    """Recent inbound messages with what became of them."""
    ctx.ready_runtime()
    query = InboundMessage.select().order_by(InboundMessage.id.desc()).limit(limit)
    if state != "all":
        query = query.where(InboundMessage.state == state)
    for row in query:
        reason = row.reason.splitlines()[-1] if row.reason else ""
        if row.state == Inbound.QUEUED and reason.startswith("waiting: "):
            # The service's trouble (database, storage), not the message's: say when it is
            # tried next, so an operator sees nothing is stuck.
            reason += f" (next try {row.next_attempt_at:%H:%M:%S}Z)"
        click.echo(f"#{row.id}\t{row.received_at:%Y-%m-%d %H:%M:%S}Z\t{row.channel}\t"
                   f"{row.state}\t{row.outcome}\tattempts {row.attempts}\t{reason}")


@spool_group.command("retry")
@click.argument("message_id", type=int, metavar="ID", required=False)
@click.option("--all-failed", is_flag=True,
              help="Queue every failed message again (not those that could not be read).")
@pass_ctx
def spool_retry(ctx: Context, message_id: int | None, all_failed: bool) -> None:
    """Queue a failed message (or with --all-failed, every one) for processing again."""
    if (message_id is None) == (not all_failed):
        raise click.UsageError("give either a message ID or --all-failed (not both)")
    runtime = ctx.ready_runtime()
    if all_failed:
        count = spool.requeue_failed(runtime)
        click.echo(f"{count} failed inbound message(s) queued again; a running service "
                   "picks them up")
        return
    if not spool.requeue(runtime, message_id):
        raise click.BadParameter(f"no failed message #{message_id} (or its raw message was "
                                 "purged)", param_hint="ID")
    click.echo(f"inbound #{message_id} queued again; a running service picks it up")


@spool_group.command("show")
@click.argument("message_id", type=int, metavar="ID")
@pass_ctx
def spool_show(ctx: Context, message_id: int) -> None:
    """One inbound message: where it came from, what became of it, and the error kept (sealed)
    when it failed."""
    runtime = ctx.ready_runtime()
    row = InboundMessage.get_or_none(InboundMessage.id == message_id)
    if row is None:
        raise click.BadParameter(f"no inbound message #{message_id}", param_hint="ID")
    click.echo(f"inbound #{row.id} received {row.received_at:%Y-%m-%d %H:%M:%S}Z over "
               f"{row.protocol or row.channel} from {row.client_ip or 'a mailbox'}")
    click.echo(f"state: {row.state} ({row.outcome or 'pending'}), attempts {row.attempts}")
    if row.reason:
        click.echo(f"reason: {row.reason}")
    error = sealed.inbound_error(runtime.phi_key, row)
    if error:
        click.echo("error:")
        click.echo(error.rstrip("\n"))
