"""Share creation is all-or-nothing: a failure half-way leaves no rows and no stored files."""

from __future__ import annotations

import pytest

from mailbridge.outbound import compose
from mailbridge.receive import spool, worker
from mailbridge.store.models import (
    AuditEvent,
    Document,
    Grant,
    InboundMessage,
    OutboundMessage,
    Share,
)
from tests.helpers import MEMBER, add_jane, share_message, wire


def stored_files(runtime):
    return [p for p in runtime.settings.documents_dir.rglob("*") if p.is_file()]


@pytest.fixture
def no_auth(runtime):
    import dataclasses

    s = runtime.settings
    return dataclasses.replace(runtime, settings=dataclasses.replace(
        s, senders=dataclasses.replace(s.senders, require_authentication=False)))


def enqueue(rt, message):
    return spool.enqueue(rt, wire(message), channel="smtp", envelope_from="x@clinic.example",
                         envelope_to=["share@portal.example"])


def test_failure_after_grants_leaves_nothing_behind(no_auth, monkeypatch):
    rt = no_auth
    add_jane()

    def receipt_fails(*args, **kwargs):
        raise RuntimeError("template error")

    monkeypatch.setattr(compose, "receipt_email", receipt_fails)
    enqueue(rt, share_message(recipients=["a@x.example", "b@y.example"]))
    assert worker.run_once(rt, "node-a")
    assert InboundMessage.get().state == "failed"
    for model in (Share, Document, Grant, OutboundMessage):
        assert model.select().count() == 0, model.__name__
    assert AuditEvent.select().where(AuditEvent.kind == "share_created").count() == 0
    assert stored_files(rt) == []


def test_message_interrupted_by_a_crash_is_processed_once_at_restart(no_auth):
    rt = no_auth
    add_jane()
    enqueue(rt, share_message())
    crashed = spool.claim_next(rt, "node-a")  # ...and the process died here
    assert crashed.state == "processing"
    assert spool.claim_next(rt, "node-b") is None  # another node respects the lease
    assert spool.recover(rt, "node-a") == 1  # node-a starts again
    assert worker.run_once(rt, "node-a")
    assert not worker.run_once(rt, "node-a")
    assert Share.select().count() == 1
    assert OutboundMessage.select().where(OutboundMessage.kind == "link").count() == 1


def test_expired_lease_of_a_dead_node_is_taken_over(no_auth):
    from mailbridge.clock import ManualClock

    clock = ManualClock()
    import dataclasses

    rt = dataclasses.replace(no_auth, clock=clock)
    add_jane()
    enqueue(rt, share_message())
    assert spool.claim_next(rt, "node-a")
    clock.advance(seconds=rt.settings.worker.lease_seconds + 1)
    assert worker.run_once(rt, "node-b")
    assert Share.select().count() == 1


def test_dns_timeout_during_authentication_is_retried_not_dropped(runtime):
    import dataclasses

    import dkim

    from tests.dkim_helpers import DkimKeyring, sign

    ring = DkimKeyring()
    pem = ring.add("clinic.example", "mb2024", bits=1024)
    dns_down = {"down": True}

    def flaky_dns(name, timeout=5):
        if dns_down["down"]:
            raise dkim.DnsTimeoutError("simulated DNS timeout")
        return ring.dnsfunc(name, timeout)

    rt = dataclasses.replace(runtime, dnsfunc=flaky_dns)
    add_jane()
    spool.enqueue(rt, sign(wire(share_message()), "clinic.example", "mb2024", pem),
                  channel="smtp", envelope_from="jane.doe@clinic.example",
                  envelope_to=["share@portal.example"])
    assert worker.run_once(rt, "node-a")
    row = InboundMessage.get()
    assert row.state == "queued" and row.next_attempt_at > row.received_at
    assert Share.select().count() == 0 and OutboundMessage.select().count() == 0
    dns_down["down"] = False
    InboundMessage.update(next_attempt_at=row.received_at).execute()
    assert worker.run_once(rt, "node-a")
    assert InboundMessage.get().state == "done" and Share.select().count() == 1


@pytest.mark.parametrize("message_id", ["=?utf-7?q?+2AA-?=", "<a@b> =?unicode-escape?q?\\ud800?="])
def test_a_message_id_the_parser_cannot_read_still_makes_the_share(no_auth, message_id):
    # message.get("Message-ID") raised UnicodeEncodeError on these: the share was never made
    # and the message parked as failed. Only a well-formed <id> is quoted in In-Reply-To.
    rt = no_auth
    add_jane()
    raw = wire(share_message(message_id="<placeholder@clinic.example>"))
    raw = raw.replace(b"<placeholder@clinic.example>", message_id.encode())
    spool.enqueue(rt, raw, channel="smtp", envelope_from="x@clinic.example",
                  envelope_to=["share@portal.example"])
    assert worker.run_once(rt, "node-a")
    assert InboundMessage.get().state == "done"
    assert Share.select().count() == 1
    receipt = OutboundMessage.get(OutboundMessage.kind == "receipt")
    assert receipt.to_addr == MEMBER


def test_a_subject_that_decodes_to_an_encoded_word_still_makes_the_share(no_auth):
    # The title "=?utf-7?q?+2AA-?=" (decoded from the member's subject) was decoded again when
    # set as the receipt's Subject, raised, and parked the message as failed.
    rt = no_auth
    add_jane()
    raw = wire(share_message(subject="placeholder")).replace(
        b"Subject: placeholder", b"Subject: =?utf-8?q?=3D=3Futf-7=3Fq=3F+2AA-=3F=3D?=")
    spool.enqueue(rt, raw, channel="smtp", envelope_from="x@clinic.example",
                  envelope_to=["share@portal.example"])
    assert worker.run_once(rt, "node-a")
    assert InboundMessage.get().state == "done"
    assert Share.select().count() == 1
    assert OutboundMessage.get(OutboundMessage.kind == "receipt").to_addr == MEMBER
