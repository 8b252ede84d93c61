"""`mailbridge audit`: prove the audit trail was not altered (`verify`), and hand it to an
auditor (`export`, CSV or JSON lines, ending with the chain's head)."""

from __future__ import annotations

import collections
import contextlib
import csv
import datetime as dt
import json
import sys

import click

from mailbridge.cli.context import Context, pass_ctx
from mailbridge.clock import system_clock
from mailbridge.shares import clinics, records
from mailbridge.store import audit
from mailbridge.store.states import Audit


def parse_day(value: str | None, option: str) -> dt.datetime | None:
    """YYYY-MM-DD or an ISO date and time, read as UTC."""
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date such as 2026-11-28",
                                 param_hint=option) from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    return parsed


@click.group("audit")
def audit_group() -> None:
    """The tamper-evident audit trail."""


def read_anchor(head: str | None, export: str | None) -> tuple[int, str] | None:
    """The head an earlier export recorded: given as SEQ:MAC, or read from the export."""
    if head is not None and export is not None:
        raise click.UsageError("give either --head or --against, not both")
    if head is not None:
        seq, _, mac = head.partition(":")
        if not seq.isdigit() or len(mac) != 64:
            raise click.BadParameter("expected SEQ:MAC as printed at the end of an export",
                                     param_hint="--head")
        return int(seq), mac.lower()
    if export is None:
        return None
    try:
        with open(export, encoding="utf-8") as f:
            last = collections.deque(f, maxlen=1)
    except OSError as exc:
        raise click.BadParameter(f"cannot read it: {exc.strerror}",
                                 param_hint="--against") from None
    line = last[0].strip() if last else ""
    try:
        if line.startswith("{"):
            values = json.loads(line)
            return int(values["chain_head_seq"]), str(values["chain_head_mac"])
        row = next(csv.reader([line]))
        if row[records.FIELDS.index("kind")] == "chain head":
            return int(row[0]), row[records.FIELDS.index("mac")]
    except (ValueError, KeyError, IndexError):
        pass
    raise click.BadParameter("its last line is not the chain head an export ends with",
                             param_hint="--against")


@audit_group.command("verify")
@click.option("--since", help="Count events from this date (UTC); the whole chain is checked.")
@click.option("--head", metavar="SEQ:MAC",
              help="A chain head recorded earlier: the chain must still hold it.")
@click.option("--against", type=click.Path(dir_okay=False), metavar="EXPORT",
              help="An earlier export: the chain must still hold the head it ends with.")
@pass_ctx
def audit_verify(ctx: Context, since: str | None, head: str | None,
                 against: str | None) -> None:
    """Walk the chain and recompute every event's MAC. Exit 0 with a count, or 1 naming the
    first bad event and what is wrong. A head kept outside the database (--head, --against)
    also catches the newest events cut off with the head rewound."""
    anchor = read_anchor(head, against)
    runtime = ctx.ready_runtime()
    verdict = audit.verify(runtime.audit_key, since=parse_day(since, "--since"), anchor=anchor)
    if verdict.ok:
        seq, _ = audit.head()
        click.echo(f"audit trail intact: {verdict.checked} event(s) checked, chain head at "
                   f"{seq}")
        return
    where = f"event id {verdict.event_id}" if verdict.event_id is not None else "the chain"
    click.echo(f"audit trail broken at {where}: {verdict.problem} "
               f"({verdict.checked} event(s) before it were intact)", err=True)
    sys.exit(1)


@audit_group.command("export")
@click.option("--share", "share_id", type=int, help="One share's events.")
@click.option("--clinic", "clinic_name", help="One clinic's events.")
@click.option("--since", help="From this date (UTC), e.g. 2026-11-01.")
@click.option("--until", help="Before this date (UTC).")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv",
              show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, writable=True),
              help="Write to this file (default: standard output).")
@pass_ctx
def audit_export(ctx: Context, share_id: int | None, clinic_name: str | None,
                 since: str | None, until: str | None, fmt: str, output: str | None) -> None:
    """Events with their time in the clinic's zone and in UTC, kind, actor, share, recipient,
    document, IP and user agent; the last line is the chain's head, to check the export
    against the live chain later. A progress bar shows on a terminal."""
    runtime = ctx.ready_runtime()
    clinic = None
    if clinic_name is not None:
        try:
            clinic = clinics.find(clinic_name)
        except clinics.ClinicError as exc:
            raise click.BadParameter(str(exc), param_hint="--clinic") from None
    selection = records.Selection(share_id=share_id, clinic=clinic,
                                  since=parse_day(since, "--since"),
                                  until=parse_day(until, "--until"))
    with contextlib.ExitStack() as stack:
        out = (stack.enter_context(open(output, "w", newline="", encoding="utf-8"))
               if output else sys.stdout)
        events = records.rows(runtime, selection)
        if sys.stderr.isatty():
            bar = stack.enter_context(click.progressbar(
                length=records.count(selection), label="exporting", file=sys.stderr))
            events = _counted(events, bar)
        written = _write(out, fmt, events)
    # After the head was written: the export proves the chain up to itself.
    with runtime.db.atomic():
        audit.record(runtime.audit_key, Audit.AUDIT_EXPORTED, system_clock(), actor="operator",
                     clinic=clinic, share=share_id,
                     detail={"events": written, "format": fmt,
                             **{k: v for k, v in (("since", since), ("until", until)) if v}})
    if output:
        click.echo(f"{written} event(s) written to {output}", err=True)


def _counted(events, bar):
    for event in events:
        bar.update(1)
        yield event


def _write(out, fmt: str, events) -> int:
    written = 0
    if fmt == "jsonl":
        for event in events:
            out.write(json.dumps(event, ensure_ascii=False) + "\n")
            written += 1
        out.write(json.dumps(records.chain_head()) + "\n")
        return written
    writer = csv.DictWriter(out, fieldnames=records.FIELDS)
    writer.writeheader()
    for event in events:
        writer.writerow(event)
        written += 1
    head = records.chain_head()
    writer.writerow({"seq": head["chain_head_seq"], "kind": "chain head",
                     "mac": head["chain_head_mac"]})
    return written
