"""`mailbridge jobs`: list the scheduled jobs or run one once (e.g. from cron)."""

from __future__ import annotations

import click

from mailbridge.cli.context import Context, pass_ctx
from mailbridge.logs import configure_logging


@click.group("jobs")
def jobs_group() -> None:
    """Scheduled jobs (`serve` runs them; cron can too)."""


@jobs_group.command("list")
def jobs_list() -> None:
    """The jobs and how often `serve` runs them."""
    from mailbridge.schedule import JOBS

    for name, (function, seconds) in JOBS.items():
        summary = " ".join((function.__doc__ or "").split()).split(". ")[0]
        click.echo(f"{name}\tevery {seconds:g} s\t{summary}")


@jobs_group.command("run")
@click.argument("name")
@pass_ctx
def jobs_run(ctx: Context, name: str) -> None:
    """Run one job once and print how many things it did. Safe on several nodes at once."""
    from mailbridge.schedule import JOBS, run_job

    if name not in JOBS:
        raise click.BadParameter(f"no job {name!r}; one of: {', '.join(JOBS)}",
                                 param_hint="NAME")
    runtime = ctx.ready_runtime()
    configure_logging(ctx.settings.service.log_level)
    click.echo(f"{name}: {run_job(runtime, name)}")
