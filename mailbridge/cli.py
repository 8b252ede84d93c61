"""The `mailbridge` command: set up, serve, and manage members, shares and the spool."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import click

from mailbridge import lifecycle, schema, spool
from mailbridge import members as member_ops
from mailbridge.clock import system_clock
from mailbridge.config import ConfigError, Settings, load_settings
from mailbridge.logs import configure_logging
from mailbridge.models import Document, Grant, InboundMessage, Member, Share
from mailbridge.runtime import Runtime, build_runtime
from mailbridge.storage import create_master_key_file

DEFAULT_CONFIG = "config.toml"


class Context:
    """Settings are loaded lazily so `--help` works without a config file."""

    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None
        self._runtime: Runtime | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = build_runtime(self.settings)
        return self._runtime

    def ready_runtime(self) -> Runtime:
        """A runtime whose database schema is current (commands that read or write rows)."""
        runtime = self.runtime
        version = schema.current_version(runtime.db)
        if version < schema.LATEST:
            raise ConfigError(f"[database] url: the database is at schema version {version}, "
                              f"expected {schema.LATEST}; run `mailbridge init` or "
                              "`mailbridge db upgrade`")
        return runtime


pass_ctx = click.make_pass_decorator(Context)


@click.group()
@click.option("--config", "config_path", envvar="MAILBRIDGE_CONFIG", default=DEFAULT_CONFIG,
              show_default=True, help="Path to config.toml (or set MAILBRIDGE_CONFIG).")
@click.pass_context
def cli(ctx: click.Context, config_path: str) -> None:
    """mailbridge: share documents by e-mail through a secure portal."""
    ctx.obj = Context(config_path)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except ConfigError as exc:
        click.echo(f"mailbridge: configuration error: {exc}", err=True)
        sys.exit(2)


# --- set-up --------------------------------------------------------------------------------


@cli.command()
@pass_ctx
def init(ctx: Context) -> None:
    """Create the data directory, the master key and the database schema."""
    settings = ctx.settings
    settings.service.data_dir.mkdir(parents=True, exist_ok=True)
    key_path = settings.master_key_path
    if not os.environ.get("MAILBRIDGE_MASTER_KEY"):
        key_path.parent.mkdir(parents=True, exist_ok=True)
        if create_master_key_file(key_path):
            click.echo(f"created master key {key_path} (back it up: documents cannot be "
                       "read without it)")
        else:
            click.echo(f"master key {key_path} already exists; kept")
    runtime = ctx.runtime
    applied = schema.upgrade(runtime.db, system_clock())
    click.echo("database schema: " + (", ".join(applied) if applied else "already current"))


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@pass_ctx
def db_upgrade(ctx: Context) -> None:
    """Apply pending schema migrations."""
    applied = schema.upgrade(ctx.runtime.db, system_clock())
    click.echo("applied: " + ", ".join(applied) if applied else "schema already current")


@db.command("version")
@pass_ctx
def db_version(ctx: Context) -> None:
    """Show the schema version."""
    click.echo(f"schema version {schema.current_version(ctx.runtime.db)} "
               f"(latest {schema.LATEST})")


# --- serve ---------------------------------------------------------------------------------


@cli.command()
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
    service.stop()
    click.echo("mailbridge: stopped")


# --- members -------------------------------------------------------------------------------


@cli.group()
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
    ctx.ready_runtime()
    try:
        member = member_ops.add_member(email, name, clinic_name, system_clock(),
                                       timezone=ctx.settings.service.timezone, admin=admin)
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
    ctx.ready_runtime()
    try:
        member = member_ops.disable_member(email)
    except member_ops.MemberError as exc:
        raise click.BadParameter(str(exc), param_hint="EMAIL") from None
    click.echo(f"member {member.email} disabled")


# --- shares --------------------------------------------------------------------------------


@cli.group()
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
    ctx.ready_runtime()
    share = Share.get_or_none(Share.id == share_id)
    if share is None:
        raise click.BadParameter(f"no share #{share_id}", param_hint="ID")
    click.echo(f"share #{share.id} created {share.created_at:%Y-%m-%d %H:%M}Z by "
               f"{share.sender.name} <{share.sender.email}> ({share.clinic.name})")
    click.echo(f"title: {share.title}")
    click.echo("documents:")
    for d in share.documents.order_by(Document.position):
        click.echo(f"  {d.filename}\t{d.kind}\t{d.size} bytes\tsha256 {d.sha256[:16]}…")
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


@shares.command("revoke")
@click.argument("share_id", type=int, metavar="ID")
@click.option("--recipient", metavar="ADDR", help="Only this recipient (default: all).")
@pass_ctx
def shares_revoke(ctx: Context, share_id: int, recipient: str | None) -> None:
    """Withdraw access now; the portal refuses the recipients' next request."""
    runtime = ctx.ready_runtime()
    share = _share_arg(share_id)
    result = lifecycle.revoke(runtime, share, address=_recipient_arg(share, recipient),
                              actor="cli")
    click.echo(result.text())


@shares.command("resend")
@click.argument("share_id", type=int, metavar="ID")
@click.option("--recipient", metavar="ADDR", help="Only this recipient (default: all "
              "who have not claimed).")
@pass_ctx
def shares_resend(ctx: Context, share_id: int, recipient: str | None) -> None:
    """New links (new token, new deadline) for recipients who have not claimed."""
    runtime = ctx.ready_runtime()
    share = _share_arg(share_id)
    result = lifecycle.resend(runtime, share, address=_recipient_arg(share, recipient),
                              actor="cli")
    click.echo(result.text())


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


# --- spool ---------------------------------------------------------------------------------


@cli.group("spool")
def spool_group() -> None:
    """Inbound messages."""


@spool_group.command("list")
@click.option("--state", type=click.Choice(["queued", "processing", "done", "ignored",
                                            "rejected", "failed", "all"]), default="all",
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
        click.echo(f"#{row.id}\t{row.received_at:%Y-%m-%d %H:%M:%S}Z\t{row.channel}\t"
                   f"{row.state}\t{row.outcome}\tattempts {row.attempts}\t"
                   f"{row.reason.splitlines()[-1] if row.reason else ''}")


@spool_group.command("retry")
@click.argument("message_id", type=int, metavar="ID")
@pass_ctx
def spool_retry(ctx: Context, message_id: int) -> None:
    """Queue a failed message for processing again."""
    runtime = ctx.ready_runtime()
    if not spool.requeue(runtime, message_id):
        raise click.BadParameter(f"no failed message #{message_id} (or its raw message was "
                                 "purged)", param_hint="ID")
    click.echo(f"inbound #{message_id} queued again; a running service picks it up")



# --- jobs ----------------------------------------------------------------------------------


@cli.group("jobs")
def jobs_group() -> None:
    """Scheduled jobs (`serve` runs them; cron can too)."""


@jobs_group.command("list")
def jobs_list() -> None:
    """The jobs and how often `serve` runs them."""
    from mailbridge.jobs import JOBS

    for name, (function, seconds) in JOBS.items():
        summary = " ".join((function.__doc__ or "").split()).split(". ")[0]
        click.echo(f"{name}\tevery {seconds:g} s\t{summary}")


@jobs_group.command("run")
@click.argument("name")
@pass_ctx
def jobs_run(ctx: Context, name: str) -> None:
    """Run one job once and print how many things it did. Safe on several nodes at once."""
    from mailbridge.jobs import JOBS

    if name not in JOBS:
        raise click.BadParameter(f"no job {name!r}; one of: {', '.join(JOBS)}",
                                 param_hint="NAME")
    runtime = ctx.ready_runtime()
    configure_logging(ctx.settings.service.log_level)
    function, _ = JOBS[name]
    click.echo(f"{name}: {function(runtime)}")


# --- imap ----------------------------------------------------------------------------------


@cli.group("imap")
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
    click.echo(f"connected to {imap.host}:{imap.port} ({imap.security}) as {imap.username}")
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
