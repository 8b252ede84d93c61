"""Issue item 1: PostgreSQL connections that die (failover, restart, a pooler's idle timeout)
or are refused for a while. Every thread of `serve` must recover by itself: everything
acknowledged is delivered within a minute of the database coming back, without a restart."""

from __future__ import annotations

import time

import pytest

from tests.faults.harness import MESSAGES, delivered, log_lines, settled, tally, wait_until

pytestmark = pytest.mark.slow

RECOVERY = 60.0
OUTAGE = 20.0


def test_connections_cut_once_repeatedly_and_refused_recover_without_a_restart(site):
    from tests.faults.harness import Sender

    site.write_config(worker={"poll_seconds": 0.5, "retry_base_seconds": 1,
                              "retry_max_seconds": 5})
    process = site.serve()
    sender = Sender(site)
    part = max(MESSAGES // 4, 10)
    batches = [range(k * part, (k + 1) * part) for k in range(4)]

    # Warm up: every thread (SMTP executor, worker, dispatcher, jobs) holds a connection.
    sender.send(batches[0])
    wait_until(lambda: delivered(site.sink, set(batches[0])), "the first batch", RECOVERY)

    # 1. Every connection cut once, while idle: the next message must go all the way.
    assert site.db.terminate() > 0
    sender.send(batches[1])
    started = time.monotonic()
    wait_until(lambda: delivered(site.sink, sender.acknowledged), "delivery after one cut",
               RECOVERY)
    once = time.monotonic() - started

    # 2. Cut again and again for 20 s while mail keeps arriving.
    sending = sender.send_in_background(batches[2], retry_for=OUTAGE + RECOVERY)
    end = time.monotonic() + OUTAGE
    while time.monotonic() < end:
        site.db.terminate()
        time.sleep(0.5)
    started = time.monotonic()
    sending.join()
    wait_until(lambda: delivered(site.sink, sender.acknowledged), "delivery after 20 s of cuts",
               RECOVERY)
    repeated = time.monotonic() - started

    # 3. No connections at all for 20 s (ALLOW_CONNECTIONS false): intake answers 451, the
    # sender retries, and everything flows once connections are allowed again.
    before = len(process.log)
    site.db.allow_connections(False)
    try:
        sending = sender.send_in_background(batches[3], retry_for=OUTAGE + RECOVERY)
        time.sleep(OUTAGE)
    finally:
        site.db.allow_connections(True)
    started = time.monotonic()
    sending.join()
    wait_until(lambda: delivered(site.sink, sender.acknowledged) and settled(site),
               "delivery after 20 s without connections", RECOVERY)
    refused = time.monotonic() - started

    assert process.proc.poll() is None, "serve must survive the outages"
    result = tally(site, "database: cut once, cut for 20 s, refused for 20 s",
                   sender.acknowledged, max(once, repeated, refused),
                   note=f"recovery after each phase {once:.1f} / {repeated:.1f} / "
                        f"{refused:.1f} s; 451s answered {sender.refusals}")
    result.report()
    assert result.acknowledged == sum(len(b) for b in batches)
    assert result.lost == 0 and result.duplicated_shares == 0 and result.undelivered == 0
    assert result.resent_with_new_message_id == 0
    # 20 s without connections is one outage: one warning when it starts and one line when
    # it ends, not a line per retry every 2 s.
    during = process.log[before:]
    assert len(log_lines(during, "outbox: database unavailable")) <= 1
    assert len(log_lines(during, "outbox: working again")) == 1
    assert "Traceback" not in process.log
