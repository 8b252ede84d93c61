"""`kill -9` at each stage — intake, worker, dispatch, expiry — then a restart: no
acknowledged message is lost, none makes two shares, and every e-mail reaches the relay;
duplicate sends (at-least-once, same Message-ID) are counted and reported."""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter

import pytest

from mailbridge.receive import spool, worker
from mailbridge.store.models import Grant, OutboundMessage, Share
from tests.faults.harness import (
    MESSAGES,
    Sender,
    Site,
    Tally,
    delivered,
    fault_message,
    links_by_recipient,
    settled,
    tally,
    wait_until,
)
from tests.helpers import MEMBER

pytestmark = pytest.mark.slow

SETTLE = 120.0


def spool_directly(site: Site, numbers) -> None:
    """Messages already acknowledged (their rows committed) before the service starts."""
    runtime = site.runtime()
    try:
        for i in numbers:
            spool.enqueue(runtime, fault_message(i), channel="smtp",
                          envelope_from=MEMBER, envelope_to=["share@portal.example"])
    finally:
        runtime.db.close()


def count(site: Site, query) -> int:
    runtime = site.runtime()
    try:
        return query().count()
    finally:
        runtime.db.close()


def crash_and_recover(site: Site, process, scenario: str, acknowledged: set[int],
                      sender_thread=None) -> Tally:
    process.kill()
    killed = time.monotonic()
    site.serve()
    if sender_thread is not None:
        sender_thread.join()
    wait_until(lambda: delivered(site.sink, acknowledged) and settled(site),
               "everything acknowledged to be delivered after the restart", SETTLE)
    result = tally(site, scenario, acknowledged, time.monotonic() - killed)
    result.report()
    assert result.lost == 0 and result.duplicated_shares == 0 and result.undelivered == 0
    assert result.resent_with_new_message_id == 0
    return result


def test_kill_at_intake(site):
    process = site.serve()
    sender = Sender(site)
    numbers = range(MESSAGES)
    sending = sender.send_in_background(numbers, retry_for=SETTLE)
    wait_until(lambda: len(sender.acknowledged) >= MESSAGES // 2, "half the messages", 60)
    result = crash_and_recover(site, process, "kill -9 at intake", sender.acknowledged, sending)
    assert result.acknowledged == MESSAGES  # the senders' retries got everything in


def test_kill_in_the_worker(site):
    spool_directly(site, range(MESSAGES))
    process = site.serve()
    wait_until(lambda: count(site, Share.select) >= MESSAGES // 3, "a third of the shares", 60)
    crash_and_recover(site, process, "kill -9 in the worker", set(range(MESSAGES)))


def test_kill_while_dispatching(site):
    spool_directly(site, range(MESSAGES))
    runtime = site.runtime()
    try:  # the shares exist and their e-mails wait: only the dispatcher has work
        while worker.run_once(runtime, "preparation"):
            pass
    finally:
        runtime.db.close()
    process = site.serve()
    wait_until(lambda: len(site.sink.messages) >= MESSAGES, "half the e-mails", 60)
    crash_and_recover(site, process, "kill -9 while dispatching", set(range(MESSAGES)))


def test_kill_during_expiry(site):
    spool_directly(site, range(MESSAGES))
    process = site.serve()
    wait_until(lambda: delivered(site.sink, set(range(MESSAGES))) and settled(site),
               "links and receipts", SETTLE)
    assert process.terminate()[0] == 0
    runtime = site.runtime()
    try:  # every link lapses while the service is down
        Grant.update(deadline=runtime.clock() - dt.timedelta(minutes=1)).execute()
    finally:
        runtime.db.close()
    # As cron would; inside `serve` the summaries would wait for the job's next minute.
    assert site.cli("jobs", "run", "expire").strip() == f"expire: {MESSAGES}"

    def summaries() -> int:
        return count(site, lambda: OutboundMessage.select().where(
            (OutboundMessage.kind == "expiry_summary") & (OutboundMessage.state == "sent")))

    before = len(site.sink.messages)
    process = site.serve()  # expiry_summary runs at start
    wait_until(lambda: summaries() >= MESSAGES // 3, "a third of the expiry summaries", 60)
    process.kill()
    killed = time.monotonic()
    site.serve()
    wait_until(lambda: count(site, lambda: Grant.select().where(Grant.state == "expired"))
               == MESSAGES and summaries() == MESSAGES and settled(site),
               "every expiry summary after the restart", SETTLE)
    recovery = time.monotonic() - killed

    runtime = site.runtime()
    try:
        share_of = {row.message_id: row.share_id for row in OutboundMessage.select()
                    .where(OutboundMessage.kind == "expiry_summary")}
    finally:
        runtime.db.close()
    copies = Counter(str(r.message["Message-ID"]) for r in site.sink.messages[before:])
    per_share = Counter(share_of[m] for m in copies if m in share_of)
    result = Tally(
        scenario="kill -9 during expiry", acknowledged=MESSAGES,
        lost=MESSAGES - len(per_share),  # shares whose sender never heard of the lapse
        duplicated_shares=sum(1 for n in per_share.values() if n > 1),  # two summaries
        undelivered=sum(1 for m in share_of if m not in copies),
        duplicate_sends=sum(n - 1 for n in copies.values()),
        resent_with_new_message_id=sum(1 for n in per_share.values() if n > 1),
        recovery_seconds=round(recovery, 1), note="lost/duplicated = expiry summaries")
    result.report()
    assert result.lost == 0 and result.duplicated_shares == 0 and result.undelivered == 0
    assert len(links_by_recipient(site.sink)) == MESSAGES  # no link was sent again
