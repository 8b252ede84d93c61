"""Two `serve` nodes on one PostgreSQL database (and its blob store), each with worker
processes and a data directory of its own: messages spread over both SMTP ports, one node
killed (`kill -9`, its worker processes with it) halfway. Every acknowledged message becomes
exactly one share and every recipient gets exactly one link e-mail — except the documented
at-least-once case: an e-mail the relay accepted from the dead node before it could record
that is sent again (same Message-ID), and counted.

`MAILBRIDGE_CLUSTER_MESSAGES` sets the number of messages (the issue's figure is 2,000)."""

from __future__ import annotations

import os
import smtplib
import threading
import time
from collections.abc import Sequence

import pytest

from tests.conftest import SHARING
from tests.faults.harness import (
    Site,
    delivered,
    fault_message,
    settled,
    tally,
    wait_until,
)
from tests.helpers import MEMBER

pytestmark = pytest.mark.slow

MESSAGES = int(os.environ.get("MAILBRIDGE_CLUSTER_MESSAGES", "200"))
PROCESSES = 2  # worker processes per node
LEASE_SECONDS = 3
# Where both nodes keep documents and the spool: the database blob store, so the nodes share
# nothing but PostgreSQL (each has a data directory of its own). Local storage on one shared
# directory instead (a network file system): "local".
STORAGE = "database"


class FailoverSender:
    """An MTA with two MX hosts: connection k starts with node k % 2, and whatever a node
    does not acknowledge (refused, cut, 451) is tried on the other."""

    def __init__(self, ports: Sequence[int], *, connections: int = 4) -> None:
        self.ports = list(ports)
        self.connections = connections
        self.acknowledged: set[int] = set()
        self.by_port = {port: 0 for port in ports}
        self.failovers = 0
        self._lock = threading.Lock()

    def send_in_background(self, numbers: Sequence[int], retry_for: float) -> threading.Thread:
        give_up_at = time.monotonic() + retry_for
        threads = [threading.Thread(target=self._send_part, daemon=True,
                                    args=(list(numbers[k::self.connections]), k, give_up_at))
                   for k in range(self.connections)]
        for thread in threads:
            thread.start()
        waiter = threading.Thread(target=lambda: [t.join() for t in threads], daemon=True)
        waiter.start()
        return waiter

    def _send_part(self, numbers: list[int], k: int, give_up_at: float) -> None:
        port = self.ports[k % len(self.ports)]
        smtp: smtplib.SMTP | None = None
        while numbers and time.monotonic() < give_up_at:
            try:
                if smtp is None:
                    smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
                smtp.sendmail(MEMBER, [SHARING], fault_message(numbers[0]))
            except (smtplib.SMTPException, OSError):
                if smtp is not None:
                    try:
                        smtp.close()
                    except OSError:
                        pass
                smtp = None
                port = self.ports[(self.ports.index(port) + 1) % len(self.ports)]
                with self._lock:
                    self.failovers += 1
                time.sleep(0.2)
                continue
            with self._lock:
                self.acknowledged.add(numbers.pop(0))
                self.by_port[port] += 1
        if smtp is not None:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass


def node_config(site: Site, node_id: str, first: Site | None = None):
    """Node `node_id`'s settings; a second node uses the first node's master key, and its data
    directory too when the storage is local."""
    service: dict[str, object] = {"node_id": node_id}
    if first is not None:
        service["master_key_file"] = str(first.data_dir / "master.key")
        service["data_dir"] = str(first.data_dir if STORAGE == "local" else site.data_dir)
    return {"service": service, "storage": {"backend": STORAGE},
            # One member sends everything here: no hourly budget.
            "smtp": {"port": site.smtp_port, "max_messages_per_hour_per_sender": 0,
                     "max_bytes_per_hour_per_sender": 0},
            "worker": {"poll_seconds": 0.5, "retry_base_seconds": 1, "retry_max_seconds": 5,
                       "lease_seconds": LEASE_SECONDS, "processes": PROCESSES}}


def test_two_nodes_one_killed_halfway_lose_nothing_and_do_nothing_twice(site, tmp_path):
    site.write_config(**node_config(site, "node-a"))
    other = Site(tmp_path / "b", site.db, site.sink)
    other.processes = site.processes  # killed with the site's at the end
    other.root.mkdir()
    other.write_config(**node_config(other, "node-b", first=site))
    a, b = site.serve(), other.serve()
    sender = FailoverSender([site.smtp_port, other.smtp_port])
    started = time.monotonic()
    sending = sender.send_in_background(range(MESSAGES), retry_for=60 + MESSAGES * 0.5)
    wait_until(lambda: len(sender.acknowledged) >= MESSAGES // 2, "half the messages",
               60 + MESSAGES * 0.5)
    a.kill_node()  # the machine of node a goes down: serve and its worker processes at once
    killed = time.monotonic()
    sending.join()
    assert sender.acknowledged == set(range(MESSAGES)), "node b took what node a could not"
    wait_until(lambda: delivered(site.sink, sender.acknowledged) and settled(site),
               "node b to finish node a's work", 60 + MESSAGES * 0.5)
    done = time.monotonic()
    result = tally(site, f"two nodes, {MESSAGES} messages, one node killed halfway",
                   sender.acknowledged, done - killed,
                   note=f"{PROCESSES} worker processes per node, lease {LEASE_SECONDS} s, "
                        f"{STORAGE} storage; "
                        f"acknowledged by port {sorted(sender.by_port.values())}, "
                        f"{sender.failovers} failover(s); {done - started:.0f} s in all; "
                        "recovery = kill to the last link e-mail")
    result.report()
    assert min(sender.by_port.values()) > 0  # both nodes took mail
    assert b.proc.poll() is None  # and the survivor kept running
    assert (result.lost, result.duplicated_shares, result.undelivered) == (0, 0, 0)
    assert result.resent_with_new_message_id == 0
    # At-least-once: at most the e-mail each of node a's senders (its worker processes'
    # dispatchers and the outbox job) had handed to the relay but not recorded as sent.
    assert result.duplicate_sends <= PROCESSES + 1
