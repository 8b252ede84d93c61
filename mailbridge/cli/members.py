"""`mailbridge members`: add, list and disable the staff allowed to share."""

from __future__ import annotations

import click

from mailbridge.cli.context import Context, pass_ctx
from mailbridge.clock import system_clock
from mailbridge.shares import members as member_ops
from mailbridge.store import audit
from mailbridge.store.models import Member
from mailbridge.store.states import Audit


@click.group()
def members() -> None:
    """Staff allowed to share."""


@members.command("add")
@click.argument("email")
@click.option("--name", required=True, help="The member's name, shown to recipients.")
@click.option("--clinic", "clinic_name", default="Clinic", show_default=True,
              help="Clinic name (created on first use).")
@click.option("--admin", is_flag=True, help="Clinic administrator.")
@pass_ctx
def members_add(ctx: Context, email: str, name: str, clinic_name: str, admin: bool) -> None:
    """Add a member (or re-activate a disabled one)."""
    runtime = ctx.ready_runtime()
    now = system_clock()
    try:
        with runtime.db.atomic():
            member = member_ops.add_member(email, name, clinic_name, now,
                                           timezone=ctx.settings.service.timezone, admin=admin)
            audit.record(runtime.audit_key, Audit.MEMBER_ADDED, now, actor="operator",
                         member=member, clinic=member.clinic, detail={"admin": admin})
    except member_ops.MemberError as exc:
        raise click.BadParameter(str(exc), param_hint="EMAIL") from None
    click.echo(f"member {member.email} ({member.name}) at {member.clinic.name}")


@members.command("list")
@pass_ctx
def members_list(ctx: Context) -> None:
    """List members."""
    ctx.ready_runtime()
    for m in Member.select().order_by(Member.email):
        state = "active" if m.active else "disabled"
        click.echo(f"{m.email}\t{m.name}\t{m.clinic.name}\t{state}{' admin' if m.is_admin else ''}")


@members.command("disable")
@click.argument("email")
@pass_ctx
def members_disable(ctx: Context, email: str) -> None:
    """Stop a member from sharing (existing shares stay)."""
    runtime = ctx.ready_runtime()
    try:
        with runtime.db.atomic():
            member = member_ops.disable_member(email)
            audit.record(runtime.audit_key, Audit.MEMBER_DISABLED, system_clock(),
                         actor="operator", member=member, clinic=member.clinic)
    except member_ops.MemberError as exc:
        raise click.BadParameter(str(exc), param_hint="EMAIL") from None
    click.echo(f"member {member.email} disabled")
