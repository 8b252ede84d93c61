"""The attack matrix's shared pieces: a running service (real SMTP in, a real sink as relay,
DKIM keys served to it) and a snapshot of everything an attack could change, so each test can
say "nothing was created, revoked, sent or stored"."""

from __future__ import annotations

import smtplib
import time
from dataclasses import dataclass

import pytest

from mailbridge.store.models import AuditEvent, Grant, InboundMessage, OutboundMessage, Share
from tests.conftest import SHARING, start_service
from tests.dkim_helpers import sign
from tests.helpers import wire


@dataclass(frozen=True)
class Snapshot:
    shares: int
    grants: tuple  # (id, state, token hash, deadline) of every grant
    outbound: int
    relayed: int
    stored_inbound: int  # rows whose raw message is still kept
    spool_files: int


def snapshot(running) -> Snapshot:
    running.drain()
    spool_dir = running.runtime.settings.spool_dir
    return Snapshot(
        shares=Share.select().count(),
        grants=tuple((g.id, g.state, g.token_hash, g.deadline)
                     for g in Grant.select().order_by(Grant.id)),
        outbound=OutboundMessage.select().count(),
        relayed=len(running.sink.messages),
        stored_inbound=InboundMessage.select().where(InboundMessage.purged_at.is_null()).count(),
        spool_files=len([p for p in spool_dir.rglob("*") if p.is_file()])
        if spool_dir.exists() else 0)


def assert_nothing_happened(running, before: Snapshot) -> None:
    """No share, no change to any grant, no mail queued or relayed, and the attacker's
    message not kept (its row and reason stay; its bytes are gone)."""
    after = snapshot(running)
    # The raw bytes go right after the row is concluded, in a transaction of their own (a
    # crash between the two leaves the deletion to the purge job): give that a moment.
    deadline = time.monotonic() + 5
    while ((after.stored_inbound, after.spool_files) != (before.stored_inbound,
                                                        before.spool_files)
           and time.monotonic() < deadline):
        time.sleep(0.05)
        after = snapshot(running)
    assert after.shares == before.shares
    assert after.grants == before.grants
    assert after.outbound == before.outbound
    assert after.relayed == before.relayed
    assert after.stored_inbound == before.stored_inbound
    assert after.spool_files == before.spool_files


@pytest.fixture
def svc(tmp_path, sink, keyring):
    """The whole service on SQLite (the PostgreSQL runs of these paths are in the unit
    suites); `svc.restart(**env)` is not needed: tests needing other settings use
    `service_with`."""
    running = start_service(tmp_path, f"sqlite:///{tmp_path / 'mb.db'}", sink, keyring)
    yield running
    running.service.stop(timeout=10)


@pytest.fixture
def service_with(tmp_path, sink, keyring):
    started = []

    def start(**env):
        running = start_service(tmp_path, f"sqlite:///{tmp_path / 'mb.db'}", sink, keyring,
                                **env)
        started.append(running)
        return running

    yield start
    for running in started:
        running.service.stop(timeout=10)


def send_raw(running, raw: bytes, *, sender: str, rcpts=(SHARING,), signed: bool = True):
    """Deliver bytes as a client would; returns smtplib's refusals (or raises them)."""
    data = wire(raw)
    if signed:
        data = sign(data, "clinic.example", "mb2024", running.keyring.private_key)
    with smtplib.SMTP("127.0.0.1", running.smtp_port, timeout=30) as smtp:
        return smtp.sendmail(sender, list(rcpts), data)


def audit_kinds() -> list[str]:
    return [e.kind for e in AuditEvent.select().order_by(AuditEvent.id)]
