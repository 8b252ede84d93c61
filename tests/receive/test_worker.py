"""The worker's side of faults: a stable node id, the service's trouble kept apart from the
message's, and leases renewed while a message is in hand."""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
import time

from mailbridge.clock import system_clock
from mailbridge.receive import spool, worker
from mailbridge.runtime import build_runtime
from mailbridge.store import schema
from mailbridge.store.models import InboundMessage
from tests.conftest import make_settings
from tests.helpers import MEMBER, share_message, wire


def enqueue(runtime) -> InboundMessage:
    return spool.enqueue(runtime, wire(share_message()), channel="smtp", envelope_from=MEMBER,
                         envelope_to=["share@portal.example"])


def reload(row: InboundMessage) -> InboundMessage:
    return InboundMessage.get_by_id(row.id)


def test_node_id_is_made_once_kept_private_and_survives_a_new_hostname(runtime, monkeypatch):
    first = worker.node_name(runtime)
    path = runtime.settings.service.data_dir / "node-id"
    assert path.read_text().strip() == first and first.startswith("node-")
    assert path.stat().st_mode & 0o777 == 0o600
    monkeypatch.setattr("socket.gethostname", lambda: "a-new-container")
    assert worker.node_name(runtime) == first


def test_configured_node_id_wins(runtime):
    service = dataclasses.replace(runtime.settings.service, node_id="clinic-eu-1")
    configured = dataclasses.replace(runtime, settings=dataclasses.replace(
        runtime.settings, service=service))
    assert worker.node_name(configured) == "clinic-eu-1"
    assert not (runtime.settings.service.data_dir / "node-id").exists()


def test_a_message_whose_raw_copy_is_gone_uses_up_its_attempts(runtime):
    # A missing blob is this message's problem, not the service's: it must not wait forever.
    row = enqueue(runtime)
    runtime.spool.delete(row.blob_id)
    for _ in range(runtime.settings.worker.max_attempts):
        InboundMessage.update(next_attempt_at=runtime.clock()).execute()
        assert worker.run_once(runtime, "node-a")
    assert reload(row).state == "failed"


def test_waiting_for_the_service_is_not_an_attempt(runtime):
    row = enqueue(runtime)
    for _ in range(runtime.settings.worker.max_attempts + 3):
        claimed = spool.claim_next(runtime, "node-a")
        assert claimed is not None and claimed.attempts == 1
        assert spool.wait_for_service(runtime, claimed, "storage full", 0) == "waiting"
    row = reload(row)
    assert row.state == "queued" and row.attempts == 0 and row.reason == "waiting: storage full"


def test_a_held_lease_is_renewed_and_one_let_go_runs_out(tmp_path, db_url):
    settings = make_settings(tmp_path / "data", db_url, MAILBRIDGE_WORKER_LEASE_SECONDS="0.6")
    runtime = build_runtime(settings, master_key=secrets.token_bytes(32))
    schema.upgrade(runtime.db, system_clock())
    try:
        row = enqueue(runtime)
        claimed = spool.claim_next(runtime, "node-a")
        with worker.lease_kept(runtime, claimed, "node-a"):
            time.sleep(1.5)  # more than twice the lease
            assert reload(row).lease_until > runtime.clock()
            assert spool.claim_next(runtime, "node-b") is None  # not taken over
        time.sleep(0.8)
        assert reload(row).lease_until < runtime.clock() - dt.timedelta(seconds=0.1)
        assert spool.claim_next(runtime, "node-b").id == row.id
    finally:
        runtime.db.close()
