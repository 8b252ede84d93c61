"""Issue item 5: a node knows its own interrupted work after a restart under a new hostname
(its id is kept in the data directory), and leases are short because they are renewed while
work is in hand: a crashed node's e-mails are taken over in about one lease, and slow work is
never taken over by another node while its node is alive."""

from __future__ import annotations

import shutil
import time
from collections import Counter

import pytest

from mailbridge.store.models import OutboundMessage
from tests.faults.harness import Sender, Site, delivered, settled, tally, wait_until

pytestmark = pytest.mark.slow


def under_hostname(name: str) -> list[str]:
    """Run a command with its own hostname, as a container restarted elsewhere would."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    return ["unshare", "--uts", "sh", "-c", f'hostname {name} && exec "$@"', "sh"]


def sending(site: Site) -> int:
    runtime = site.runtime()
    try:
        return OutboundMessage.select().where(OutboundMessage.state == "sending").count()
    finally:
        runtime.db.close()


def test_restart_under_a_new_hostname_resumes_its_own_interrupted_emails_at_once(site):
    site.sink.delay_seconds = 30  # the relay stalls: the e-mails stay "sending"
    first = site.serve(prefix=under_hostname("mailbridge-7f3a"))
    Sender(site, connections=1).send([0])
    wait_until(lambda: sending(site) >= 1, "an e-mail in hand", 30)
    first.kill()
    site.sink.delay_seconds = 0
    node_id = (site.data_dir / "node-id").read_text().strip()
    assert (site.data_dir / "node-id").stat().st_mode & 0o777 == 0o600

    started = time.monotonic()
    site.serve(prefix=under_hostname("mailbridge-c91e"))
    wait_until(lambda: delivered(site.sink, {0}) and settled(site), "the interrupted e-mails",
               20)  # far less than the 60 s lease: recognised as this node's own work
    tally(site, "restart under a new hostname", {0}, time.monotonic() - started,
          note="recovery = restart to delivery of the interrupted e-mails").report()
    assert (site.data_dir / "node-id").read_text().strip() == node_id


def test_slow_sends_are_kept_by_a_heartbeat_and_a_dead_nodes_are_taken_over(site, tmp_path):
    lease = 3
    site.write_config(service={"node_id": "node-a"},
                      worker={"poll_seconds": 0.5, "lease_seconds": lease})
    other = Site(tmp_path / "b", site.db, site.sink)
    other.processes = site.processes  # killed with the site's at the end
    other.root.mkdir()
    other.write_config(service={"node_id": "node-b", "data_dir": str(site.data_dir)},
                       worker={"poll_seconds": 0.5, "lease_seconds": lease})
    site.sink.delay_seconds = 2 * lease  # each send outlasts the lease twice
    a = site.serve()
    b = other.serve()
    sender = Sender(site, connections=1)
    sender.send(range(3))
    wait_until(lambda: delivered(site.sink, {0, 1, 2}) and settled(site), "three slow sends",
               120)
    counts = Counter(str(r.message["Message-ID"]) for r in site.sink.messages)
    assert max(counts.values()) == 1, "a node took over e-mails another node was sending"

    # Node a dies while it holds e-mails: node b sends them after about one lease.
    assert b.terminate()[0] == 0
    sender.send(range(3, 5))
    wait_until(lambda: sending(site) >= 1, "e-mails in node a's hand", 30)
    a.kill()
    site.sink.delay_seconds = 0
    died = time.monotonic()
    other.serve()
    wait_until(lambda: delivered(site.sink, set(range(5))) and settled(site),
               "node a's e-mails sent by node b", 10 * lease)
    tally(site, f"node killed while sending, taken over by another (lease {lease} s)",
          sender.acknowledged, time.monotonic() - died,
          note="recovery = kill to delivery by the other node").report()
