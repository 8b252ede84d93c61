"""Issue item 2: a full disk is the service's problem, not the message's. Messages acknowledged
before the disk filled wait (never `failed`, however long it lasts), `spool list` says why,
the log warns once per outage, and everything is processed once space returns."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    MESSAGES,
    Sender,
    delivered,
    log_lines,
    settled,
    tally,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_documents_disk(site):
    """The documents directory on a 1 MiB tmpfs (root only): a real ENOSPC."""
    where = site.data_dir / "documents"
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                              str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        site.kill_all()
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where: Path) -> Path:
    filler = where / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_full_disk_makes_messages_wait_not_fail_and_they_go_through_when_space_returns(
        site, tiny_documents_disk):
    # Two attempts would park a message as failed at once if a full disk counted.
    site.write_config(worker={"poll_seconds": 0.5, "max_attempts": 2, "retry_base_seconds": 0.5,
                              "retry_max_seconds": 2})
    filler = fill(tiny_documents_disk)
    process = site.serve()
    numbers = range(max(MESSAGES // 4, 20))
    sender = Sender(site)
    sender.send(numbers)  # the spool is on another disk: accepted
    assert sender.acknowledged == set(numbers)

    # Full for a while: well past two attempts' worth of back-off for every message.
    time.sleep(12)
    listing = site.cli("spool", "list", "--limit", "1000")
    rows = [line for line in listing.splitlines() if line.startswith("#")]
    assert len(rows) == len(numbers)
    assert all("\tqueued\t" in row and "waiting: storage full (next try " in row for row in rows
               if "\tprocessing\t" not in row), listing
    assert "\tfailed\t" not in listing
    assert len(log_lines(process.log, "worker: storage full")) == 1  # once per outage

    filler.unlink()  # space returns
    started = time.monotonic()
    wait_until(lambda: delivered(site.sink, set(numbers)) and settled(site),
               "every message after space returned", 60)
    recovery = time.monotonic() - started
    assert len(log_lines(process.log, "worker: working again after storage full")) == 1
    result = tally(site, "full documents disk for 12 s", sender.acknowledged, recovery,
                   note="max_attempts 2; none failed")
    result.report()
    assert result.lost == 0 and result.duplicated_shares == 0 and result.undelivered == 0
    assert "\tfailed\t" not in site.cli("spool", "list", "--limit", "1000")
