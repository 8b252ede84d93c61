"""`mailbridge clinics`: each clinic's own policy — time zone, claim and reminder hours, how
long documents are kept, the contact line recipients see, the name in our From."""

from __future__ import annotations

import dataclasses

import click

from mailbridge.cli.context import Context, pass_ctx
from mailbridge.clock import system_clock
from mailbridge.shares import clinics as ops
from mailbridge.store import audit
from mailbridge.store.models import Clinic, Member
from mailbridge.store.states import Audit


def policy_options(command):
    for option in reversed([
        click.option("--timezone", help="IANA time zone, e.g. America/New_York."),
        click.option("--claim-hours", type=float, help="How long a link can be claimed."),
        click.option("--remind-before-hours", type=float,
                     help="One reminder this long before the deadline; 0: none."),
        click.option("--document-retention-days", type=float,
                     help="Documents are removed this long after sharing; 0: kept for good."),
        click.option("--contact", help='A line such as "Front desk: (555) 010-0200", shown '
                                        "to recipients on expired and revoked pages and in "
                                        "their e-mails."),
        click.option("--display-name", help='The name in our e-mails\' From, e.g. "Riverside '
                                            'PT" ("Riverside PT via mailbridge").'),
        click.option("--legal-hold/--no-legal-hold", default=None,
                     help="While on, nothing of the clinic's is purged."),
        click.option("--watermark", type=click.Choice(["on", "off", "configuration"]),
                     help="PDF pages and images handed out carry the recipient's address, "
                          "the date and the share; configuration: [documents] watermark."),
    ]):
        command = option(command)
    return command


def _changes(values: dict) -> ops.Changes:
    return ops.Changes(**{k: v for k, v in values.items() if k in ops.Changes.__annotations__})


@click.group()
def clinics() -> None:
    """Clinics and their own policy (configuration values hold until a clinic sets its own)."""


@clinics.command("add")
@click.argument("name")
@policy_options
@pass_ctx
def clinics_add(ctx: Context, name: str, **values) -> None:
    """Add a clinic."""
    runtime = ctx.ready_runtime()
    changes = _changes(values)
    now = system_clock()
    try:
        with runtime.db.atomic():
            clinic = ops.add(name, changes, ctx.settings, now)
            audit.record(runtime.audit_key, Audit.CLINIC_ADDED, now, actor="operator",
                         clinic=clinic, detail=_given(changes))
    except ops.ClinicError as exc:
        raise click.BadParameter(str(exc), param_hint=exc.field) from None
    _show(ctx, clinic)


@clinics.command("set")
@click.argument("name")
@policy_options
@pass_ctx
def clinics_set(ctx: Context, name: str, **values) -> None:
    """Change a clinic's policy."""
    runtime = ctx.ready_runtime()
    changes = _changes(values)
    try:
        with runtime.db.atomic():
            clinic = ops.change(ops.find(name), changes)
            audit.record(runtime.audit_key, Audit.CLINIC_CHANGED, system_clock(),
                         actor="operator", clinic=clinic, detail=_given(changes))
    except ops.ClinicError as exc:
        raise click.BadParameter(str(exc), param_hint=exc.field) from None
    _show(ctx, clinic)


@clinics.command("show")
@click.argument("name")
@pass_ctx
def clinics_show(ctx: Context, name: str) -> None:
    """A clinic's policy in effect, and where each value comes from."""
    ctx.ready_runtime()
    try:
        clinic = ops.find(name)
    except ops.ClinicError as exc:
        raise click.BadParameter(str(exc), param_hint=exc.field) from None
    _show(ctx, clinic)


@clinics.command("list")
@pass_ctx
def clinics_list(ctx: Context) -> None:
    """Every clinic with its time zone and number of active members."""
    ctx.ready_runtime()
    for clinic in Clinic.select().order_by(Clinic.name):
        active = (Member.select().where((Member.clinic == clinic)
                                        & (Member.active == True)).count())  # noqa: E712
        hold = "\tlegal hold" if clinic.legal_hold else ""
        click.echo(f"{clinic.name}\t{clinic.timezone}\t{active} active member(s){hold}")


def _given(changes: ops.Changes) -> dict:
    """What the operator set, for the audit trail (a legal hold or a shorter retention is
    exactly what an auditor asks about)."""
    return {k: v for k, v in dataclasses.asdict(changes).items() if v is not None}


def _show(ctx: Context, clinic: Clinic) -> None:
    rules = ops.policy(clinic, ctx.settings)

    def origin(own) -> str:
        return "" if own is not None else " (configuration)"

    retention = (f"{rules.document_retention_days:g} days" if rules.document_retention_days
                 else "kept for good")
    click.echo(f"clinic: {clinic.name}")
    click.echo(f"timezone: {rules.timezone}")
    click.echo(f"claim hours: {rules.claim_hours:g}{origin(clinic.claim_hours)}")
    click.echo(f"remind before hours: {rules.remind_before_hours:g}"
               f"{origin(clinic.remind_before_hours)}")
    click.echo(f"document retention: {retention}")
    click.echo(f"contact: {rules.contact or '(none)'}")
    click.echo(f"display name: {rules.display_name}")
    click.echo(f"legal hold: {'on' if rules.legal_hold else 'off'}")
    click.echo(f"watermark: {'on' if rules.watermark else 'off'}{origin(clinic.watermark)}")
