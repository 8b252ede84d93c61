"""Roles split over commands on one PostgreSQL database: `serve --no-worker` takes mail in but
leaves it to the workers, `mailbridge worker` processes it in `[worker] processes` worker
processes, a worker process that dies is replaced, and SIGTERM stops them all in time."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from mailbridge.store.models import InboundMessage
from tests.conftest import ROOT
from tests.faults.harness import (
    Sender,
    alive,
    delivered,
    environment,
    settled,
    tally,
    wait_until,
)

pytestmark = pytest.mark.slow


def worker_pids(process) -> list[int]:
    match = re.search(r"(\d+) worker process\(es\) \(pids ([\d ]+)\)", process.stdout)
    assert match, process.stdout
    pids = [int(p) for p in match[2].split()]
    assert len(pids) == int(match[1])
    return pids


def queued(site) -> int:
    runtime = site.runtime()
    try:
        return InboundMessage.select().where(InboundMessage.state == "queued").count()
    finally:
        runtime.db.close()


def test_intake_without_workers_then_workers_alone_and_a_dead_worker_process_replaced(site):
    site.write_config(worker={"poll_seconds": 0.5, "retry_base_seconds": 1,
                              "retry_max_seconds": 5, "processes": 2})
    intake = site.serve(command=["serve", "--no-worker"])
    assert "worker process" not in intake.stdout
    sender = Sender(site, connections=2)
    sender.send(range(6))
    assert sender.acknowledged == set(range(6))
    time.sleep(3)  # several of the workers' polls: nobody here may process the mail
    assert queued(site) == 6 and site.sink.messages == []

    workers = site.serve(command=["worker"])
    assert "SMTP intake" not in workers.stdout and "portal on" not in workers.stdout
    wait_until(lambda: delivered(site.sink, set(range(6))) and settled(site),
               "the worker command to process the intake's mail", 60)
    first, second = worker_pids(workers)
    family = set(workers.family())
    assert {first, second} <= family

    os.kill(first, signal.SIGKILL)  # a worker process crashes (the OOM killer, a bug)
    wait_until(lambda: "worker process 1 ended" in workers.log, "the crash to be seen", 10)
    wait_until(lambda: len(set(workers.family()) - family) >= 1, "a new worker process", 20)
    sender.send(range(6, 12))
    wait_until(lambda: delivered(site.sink, set(range(12))) and settled(site),
               "mail processed after the restart", 60)

    family = workers.family()
    status, seconds = workers.terminate()
    assert status == 0 and seconds < 10  # [service] stop_timeout_seconds
    assert workers.stdout.rstrip().endswith("mailbridge: stopped")
    time.sleep(0.5)
    assert not [pid for pid in family if alive(pid)], "a worker process outlived its parent"
    result = tally(site, "intake node + worker node, a worker process killed",
                   sender.acknowledged)
    result.report()
    assert (result.lost, result.duplicated_shares, result.undelivered) == (0, 0, 0)
    assert result.duplicate_sends == 0 and result.resent_with_new_message_id == 0


def test_worker_processes_die_with_their_parent(site):
    """`kill -9` of the parent alone: its worker processes go too (as on a machine going
    down), so none goes on sending what the restarted node resumes."""
    site.write_config(worker={"poll_seconds": 0.5, "processes": 2})
    node = site.serve()
    children = worker_pids(node)
    node.kill()
    wait_until(lambda: not [pid for pid in children if alive(pid)],
               "the worker processes to end with their parent", 10)


def test_serve_with_every_role_left_out_says_so(site):
    done = subprocess.run([sys.executable, "-m", "mailbridge", "--config", str(site.config),
                           "serve", "--no-smtp", "--no-worker", "--no-web", "--no-scheduler"],
                          cwd=ROOT, env=environment(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "nothing to run" in done.stderr
