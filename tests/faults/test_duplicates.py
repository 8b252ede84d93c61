"""Issue item 3: delivery to the relay is at-least-once. When the service dies after the relay
has a message but before it learns so (the 250 lost with the process), the e-mail is sent
again at the next start — byte for byte the same, with the same Message-ID, so a recipient's
mail client shows it once."""

from __future__ import annotations

import pytest

from tests.faults.harness import (
    Sender,
    links_by_recipient,
    recipient,
    settled,
    tally,
    wait_until,
)
from tests.helpers import MEMBER

pytestmark = pytest.mark.slow


def test_an_email_resent_after_a_crash_carries_the_same_message_id(site):
    process = site.serve()
    killed = []

    def crash_before_the_250_arrives(received):
        # The relay has the link e-mail; the service dies before it reads the answer. The
        # worker process that sends is killed here too, not left to die with its parent: a
        # parent's death reaches its children only once the kernel has reaped it, by which
        # time the sender may have read the 250 and recorded it.
        if not killed and MEMBER not in received.rcpt_tos:
            killed.append(received)
            process.kill_node()

    site.sink.on_message = crash_before_the_250_arrives
    Sender(site, connections=1).send([0])
    wait_until(lambda: killed and process.proc.poll() is not None, "the crash", 30)
    site.sink.on_message = None

    site.serve()  # the same node: its interrupted e-mails are due at once
    wait_until(lambda: len(links_by_recipient(site.sink).get(recipient(0), [])) >= 2
               and settled(site), "the e-mail sent again", 30)
    copies = [r for r in site.sink.messages if recipient(0) in r.rcpt_tos]
    assert len(copies) == 2
    first, second = copies
    assert first.message["Message-ID"] == second.message["Message-ID"]
    assert first.raw == second.raw  # the sealed message, re-sent as it was
    result = tally(site, "kill -9 after the relay has an e-mail", {0})
    result.report()
    assert result.duplicate_sends == 1 and result.resent_with_new_message_id == 0
