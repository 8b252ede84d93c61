"""`mailbridge shares`: list, show, revoke, resend, extend, hold and report on shares."""

from __future__ import annotations

import click

from mailbridge.cli.context import Context, pass_ctx
from mailbridge.shares import lifecycle, records, retention
from mailbridge.store import sealed
from mailbridge.store.models import Document, Grant, Share


@click.group()
def shares() -> None:
    """Shares and their recipients."""


@shares.command("list")
@click.option("--limit", default=50, show_default=True)
@pass_ctx
def shares_list(ctx: Context, limit: int) -> None:
    """Newest shares first."""
    ctx.ready_runtime()
    for s in Share.select().order_by(Share.id.desc()).limit(limit):
        states = [g.state for g in s.grants]
        click.echo(f"#{s.id}\t{s.created_at:%Y-%m-%d %H:%M}Z\t{s.sender.email}\t"
                   f"{s.documents.count()} document(s)\t"
                   f"{len(states)} recipient(s): " + ", ".join(sorted(set(states))))


@shares.command("show")
@click.argument("share_id", type=int, metavar="ID")
@pass_ctx
def shares_show(ctx: Context, share_id: int) -> None:
    """One share: documents and recipients."""
    runtime = ctx.ready_runtime()
    share = _share_arg(share_id)
    click.echo(f"share #{share.id} created {share.created_at:%Y-%m-%d %H:%M}Z by "
               f"{share.sender.name} <{share.sender.email}> ({share.clinic.name})")
    click.echo(f"title: {sealed.share_title(runtime.phi_key, share)}")
    if share.legal_hold:
        click.echo("legal hold: on (kept past the clinic's retention)")
    if share.purged_at is not None:
        click.echo(f"documents removed under retention {share.purged_at:%Y-%m-%d %H:%M}Z")
    click.echo("documents:")
    for d in share.documents.order_by(Document.position):
        click.echo(f"  {sealed.document_name(runtime.phi_key, d)}\t{d.kind}\t{d.size} bytes\t"
                   f"sha256 {d.sha256[:16]}…")
    click.echo("recipients:")
    for g in share.grants.order_by(Grant.id):
        click.echo(f"  {g.address}\t{g.state}\tdeadline {g.deadline:%Y-%m-%d %H:%M}Z\t"
                   f"link e-mail {g.delivery}")


def _share_arg(share_id: int) -> Share:
    share = Share.get_or_none(Share.id == share_id)
    if share is None:
        raise click.BadParameter(f"no share #{share_id}", param_hint="ID")
    return share


def _recipient_arg(share: Share, address: str | None) -> str | None:
    if address is None:
        return None
    normalised = lifecycle.normalise_address(address)
    if not Grant.select().where((Grant.share == share) & (Grant.address == normalised)).exists():
        raise click.BadParameter(f"{normalised} is not a recipient of share #{share.id}",
                                 param_hint="--recipient")
    return normalised


def _for_recipients(ctx: Context, operation, share_id: int, recipient: str | None) -> None:
    """Run a lifecycle operation for all recipients of a share, or one, as the actor `cli`."""
    runtime = ctx.ready_runtime()
    share = _share_arg(share_id)
    result = operation(runtime, share, address=_recipient_arg(share, recipient), actor="cli")
    click.echo(result.text())


@shares.command("revoke")
@click.argument("share_id", type=int, metavar="ID")
@click.option("--recipient", metavar="ADDR", help="Only this recipient (default: all).")
@pass_ctx
def shares_revoke(ctx: Context, share_id: int, recipient: str | None) -> None:
    """Withdraw access now; the portal refuses the recipients' next request."""
    _for_recipients(ctx, lifecycle.revoke, share_id, recipient)


@shares.command("resend")
@click.argument("share_id", type=int, metavar="ID")
@click.option("--recipient", metavar="ADDR", help="Only this recipient (default: all "
              "who have not claimed).")
@pass_ctx
def shares_resend(ctx: Context, share_id: int, recipient: str | None) -> None:
    """New links (new token, new deadline) for recipients who have not claimed."""
    _for_recipients(ctx, lifecycle.resend, share_id, recipient)


@shares.command("extend")
@click.argument("share_id", type=int, metavar="ID")
@click.option("--hours", type=float, default=None,
              help="How much longer (default [shares] claim_hours, at most max_extend_hours).")
@pass_ctx
def shares_extend(ctx: Context, share_id: int, hours: float | None) -> None:
    """More time to claim the links not yet claimed."""
    runtime = ctx.ready_runtime()
    share = _share_arg(share_id)
    try:
        result = lifecycle.extend(runtime, share, hours=hours, actor="cli")
    except lifecycle.LifecycleError as exc:
        raise click.BadParameter(str(exc), param_hint="--hours") from None
    click.echo(result.text())


@shares.command("status")
@click.argument("share_id", type=int, metavar="ID")
@pass_ctx
def shares_status(ctx: Context, share_id: int) -> None:
    """The same report a `status` reply gets by e-mail."""
    runtime = ctx.ready_runtime()
    click.echo(lifecycle.status_report(runtime, _share_arg(share_id)), nl=False)


@shares.command("audit")
@click.argument("share_id", type=int, metavar="ID")
@pass_ctx
def shares_audit(ctx: Context, share_id: int) -> None:
    """One share's full history, oldest first, times in its clinic's zone."""
    runtime = ctx.ready_runtime()
    _share_arg(share_id)
    for row in records.rows(runtime, records.Selection(share_id=share_id)):
        parts = [row["time_local"], row["kind"].replace("_", " ")]
        if row["actor"]:
            parts.append(f"by {row['actor']}")
        if row["recipient"]:
            parts.append(f"recipient {row['recipient']}")
        if row["document"]:
            parts.append(f"document {row['document']}")
        if row["ip"]:
            parts.append(f"from {row['ip']}")
        click.echo("  ".join(parts))


@shares.command("hold")
@click.argument("share_id", type=int, metavar="ID")
@click.option("--release", is_flag=True, help="Release the hold instead.")
@pass_ctx
def shares_hold(ctx: Context, share_id: int, release: bool) -> None:
    """Put a share under legal hold: its documents outlive the clinic's retention until the
    hold is released. A share already purged stays purged."""
    runtime = ctx.ready_runtime()
    share = _share_arg(share_id)
    changed = retention.hold(runtime, share, on=not release, actor="operator")
    state = "released" if release else "on"
    click.echo(f"share #{share.id}: legal hold {state}" + ("" if changed else " (already)"))
    if not release and share.purged_at is not None:
        click.echo("note: its documents were already removed under retention", err=True)
