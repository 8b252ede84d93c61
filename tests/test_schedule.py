"""What `serve` runs on a timer and `mailbridge jobs run` runs once: the scheduler's wiring, the
outbox and spool jobs for cron set-ups, outages met by a job, and stops between items."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import threading

import pytest
from click.testing import CliRunner

from mailbridge import schedule
from mailbridge.cli import cli
from mailbridge.clock import system_clock
from mailbridge.config import load_settings
from mailbridge.receive import spool
from mailbridge.runtime import build_runtime
from mailbridge.store.models import (
    Grant,
    InboundMessage,
    Share,
)
from tests.helpers import MEMBER, MINIMAL_CONFIG, add_jane, share_message
from tests.shares.test_jobs import link_page
from tests.shares.test_notify import (
    SMITH,
    configured,
    grant_of,
    link_token,
    sent,
    shared,
    text_of,
)
from tests.smtp_sink import SmtpSink


def make_grant(now, hours=24, address="dr@x.example", state="pending"):
    member = add_jane() if not Share.select().exists() else Share.get().sender
    share = Share.get_or_none() or Share.create(
        clinic=member.clinic, sender=member, created_at=now, dedupe_key="k",
        reply_key_hash="r")
    return Grant.create(share=share, address=address, token_hash=address, state=state,
                        deadline=now + dt.timedelta(hours=hours), created_at=now)


def test_expiry_with_the_scheduler_running(runtime):
    rt = configured(runtime)
    share = shared(rt)
    token = link_token(rt, grant_of(share, SMITH))
    scheduler = schedule.build_scheduler(rt)
    scheduler.start(paused=True)  # running; the test fires the jobs itself, on its clock
    try:
        expire, summary = scheduler.get_job("expire"), scheduler.get_job("expiry_summary")
        rt.clock.advance(hours=24, seconds=-1)
        assert expire.func(*expire.args) == 0 and summary.func(*summary.args) == 0
        assert "This link has expired" not in link_page(rt, token)
        rt.clock.advance(seconds=2)
        assert "This link has expired" in link_page(rt, token)
        assert expire.func(*expire.args) == 1
        assert grant_of(share, SMITH).state == "expired"
        assert summary.func(*summary.args) == 1
        assert summary.func(*summary.args) == 0
    finally:
        scheduler.shutdown()
    [(row, message)] = sent(rt, "expiry_summary")
    assert row.to_addr == MEMBER and SMITH in text_of(message)


def test_spool_and_outbox_jobs_process_what_is_due(runtime):
    with SmtpSink() as sink:
        rt = configured(runtime, outbound={
            "transport": "smtp",
            "smtp": dataclasses.replace(runtime.settings.outbound.smtp, port=sink.port)})
        add_jane()
        for i in range(2):
            msg = share_message(recipients=[f"dr{i}@ortho.example"])
            spool.enqueue(rt, bytes(msg), channel="smtp", envelope_from=MEMBER,
                          envelope_to=["share@portal.example"])
        assert schedule.process_spool(rt) == 2
        assert schedule.process_spool(rt) == 0
        assert schedule.dispatch_outbox(rt) == 4  # a link and a receipt each
        assert len(sink.wait_for(4)) == 4
        assert schedule.dispatch_outbox(rt) == 0


# --- purge -----------------------------------------------------------------------------------


def test_jobs_run_prints_the_count_and_jobs_list_names_them(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("MAILBRIDGE_"):
            monkeypatch.delenv(name)
    cfg = tmp_path / "config.toml"
    cfg.write_text(MINIMAL_CONFIG)
    runner = CliRunner()
    assert runner.invoke(cli, ["--config", str(cfg), "init"]).exit_code == 0
    rt = build_runtime(load_settings(cfg, env={}))
    try:
        make_grant(system_clock(), hours=-1, address="a@x.example")
        make_grant(system_clock(), hours=-1, address="b@x.example")
        make_grant(system_clock(), hours=1, address="c@x.example")
    finally:
        rt.db.close()

    first = runner.invoke(cli, ["--config", str(cfg), "jobs", "run", "expire"])
    assert first.exit_code == 0 and first.stdout == "expire: 2\n"
    assert runner.invoke(cli, ["--config", str(cfg), "jobs", "run", "expire"]).stdout == \
        "expire: 0\n"
    listed = runner.invoke(cli, ["--config", str(cfg), "jobs", "list"]).stdout
    assert [line.split("\t")[0] for line in listed.splitlines()] == list(schedule.JOBS)
    unknown = runner.invoke(cli, ["--config", str(cfg), "jobs", "run", "nope"])
    assert unknown.exit_code != 0 and "no job 'nope'" in unknown.stderr


def test_a_scheduled_job_recovers_from_cut_connections_by_itself(runtime, caplog):
    if not runtime.db.__class__.__name__.startswith("Recovering"):
        pytest.skip("connections are cut on PostgreSQL")
    from concurrent.futures import ThreadPoolExecutor

    from playhouse.db_url import connect

    from mailbridge.store.outages import Outage
    from tests.conftest import PG_ADMIN_URL

    stop = threading.Event()
    outage = Outage(schedule.log, "expire")
    with ThreadPoolExecutor(1) as pool:  # one thread, as a pooled scheduler thread is reused
        def run():
            return pool.submit(schedule._guarded, "expire", outage, runtime, stop).result()

        assert run() == 0
        admin = connect(PG_ADMIN_URL)
        admin.execute_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()",
                          (runtime.db.database,))
        admin.close()
        make_grant(system_clock() - dt.timedelta(hours=25))
        assert run() == 1
    assert not outage.active


def test_a_stopping_service_ends_the_outbox_and_spool_jobs_between_items(runtime):
    add_jane()
    stop = threading.Event()
    stop.set()
    spool.enqueue(runtime, bytes(share_message()), channel="smtp", envelope_from=MEMBER,
                  envelope_to=["share@portal.example"])
    assert schedule.process_spool(runtime, stop=stop) == 0
    assert schedule.dispatch_outbox(runtime, stop=stop) == 0
    assert InboundMessage.get().state == "queued"


def test_a_node_without_workers_leaves_the_outbox_and_spool_jobs_to_others(runtime):
    everything = schedule.build_scheduler(runtime)
    intake_only = schedule.build_scheduler(runtime, workers=False)
    assert {job.id for job in everything.get_jobs()} == set(schedule.JOBS)
    assert {job.id for job in intake_only.get_jobs()} == set(schedule.JOBS) - {"outbox", "spool"}
