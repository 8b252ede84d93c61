"""Issue item 4: SIGTERM is bounded. With hundreds of e-mails and messages waiting, `serve`
finishes the item in hand, hands the rest back and exits within `[service]
stop_timeout_seconds` — and sends nothing more once it has been told to stop."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from mailbridge.outbound import compose, outbox
from mailbridge.receive import spool
from mailbridge.store.models import InboundMessage, OutboundMessage
from tests.faults.harness import fault_message, settled, tally, wait_until
from tests.helpers import MEMBER

pytestmark = pytest.mark.slow

WAITING_EMAILS = 700
WAITING_MESSAGES = 100


def make_backlog(site) -> None:
    runtime = site.runtime()
    try:
        with runtime.db.atomic():
            for i in range(WAITING_EMAILS):
                to = f"w{i}@ortho.example"
                msg = compose.link_email(runtime.settings, to=to,
                                         link_url=f"http://portal.example/s/{i:043d}",
                                         clinic_name="Riverside PT", sender_name="Jane Doe",
                                         document_count=1, deadline_text="tomorrow")
                outbox.enqueue(runtime, msg, kind="notice", to_addr=to)
        for i in range(WAITING_MESSAGES):
            spool.enqueue(runtime, fault_message(i), channel="smtp",
                          envelope_from=MEMBER, envelope_to=["share@portal.example"])
    finally:
        runtime.db.close()


def in_hand(site) -> tuple[int, int]:
    runtime = site.runtime()
    try:
        return (InboundMessage.select().where(InboundMessage.state == "processing").count(),
                OutboundMessage.select().where(OutboundMessage.state == "sending").count())
    finally:
        runtime.db.close()


def test_sigterm_with_hundreds_waiting_exits_in_time_and_sends_nothing_more(site):
    make_backlog(site)
    process = site.serve()
    # The dispatchers and the scheduler's outbox job (run at start) are all sending now.
    wait_until(lambda: len(site.sink.messages) >= 100, "sending to be under way", 30)
    signalled = time.monotonic()
    status, seconds = process.terminate()
    after_signal = [r for r in site.sink.messages if r.at >= signalled]
    print(f"\nSIGTERM with {WAITING_EMAILS + WAITING_MESSAGES} items waiting: exit {status} "
          f"after {seconds:.1f} s, {len(after_signal)} e-mail(s) sent after the signal, "
          f"{len(site.sink.messages)} before")

    assert status == 0 and seconds < 10  # [service] stop_timeout_seconds
    assert process.stdout.rstrip().endswith("mailbridge: stopped")
    # At most the e-mail in hand of each sender (each worker process's dispatcher, the
    # outbox job).
    assert len(after_signal) <= site.runtime().settings.worker.processes + 1
    assert len(site.sink.messages) < WAITING_EMAILS, "the backlog was not waiting"
    assert in_hand(site) == (0, 0), "claimed rows were not handed back"

    site.serve()
    wait_until(lambda: settled(site) and len(site.sink.messages) >= WAITING_EMAILS,
               "the rest after a restart", 90)
    counts = Counter(str(r.message["Message-ID"]) for r in site.sink.messages)
    assert max(counts.values()) == 1, "an e-mail was sent twice"
    result = tally(site, f"SIGTERM with {WAITING_EMAILS} e-mails and {WAITING_MESSAGES} "
                         "messages waiting", set(range(WAITING_MESSAGES)), seconds,
                   note=f"recovery = time to exit; {len(after_signal)} e-mail(s) sent after "
                        "the signal")
    result.report()
    assert result.lost == 0 and result.duplicated_shares == 0 and result.undelivered == 0
