"""`mailbridge shares audit ID` shows documents sent back as part of the original share's
history: the exchange, and the grant for the member's own address that carries them."""

from __future__ import annotations

import pytest

from mailbridge.config import load_settings
from mailbridge.runtime import build_runtime
from mailbridge.shares import send_back
from mailbridge.store import audit, sealed
from mailbridge.store.models import Account, Grant, Member, Share
from mailbridge.store.states import Audit, GrantState
from tests.cli.test_cli import ok
from tests.helpers import MEMBER, MINIMAL_CONFIG, one_page_pdf

DOCTOR = "dr.smith@ortho.example"


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL_CONFIG)
    ok(path, "init")
    ok(path, "members", "add", MEMBER, "--name", "Jane Doe", "--clinic", "Riverside PT")
    return path


def test_shares_audit_shows_documents_sent_back(cfg):
    runtime = build_runtime(load_settings(cfg, env={}))
    try:
        now = runtime.clock()
        jane = Member.get(Member.email == MEMBER)
        share = Share.create(clinic=jane.clinic, sender=jane, created_at=now, dedupe_key="k",
                             reply_key_hash="r")
        sealed.seal_share(runtime.phi_key, share, "POC for R.T.", "")
        audit.record(runtime.audit_key, Audit.SHARE_CREATED, now, actor=MEMBER, share=share)
        account = Account.create(email=DOCTOR, password_hash="x", created_at=now,
                                 verified_at=now)
        grant = Grant.create(share=share, address=DOCTOR, token_hash="t", deadline=now,
                             created_at=now, state=GrantState.CLAIMED, account=account)
        files = send_back.check_files([("signed.pdf", one_page_pdf("signed"))],
                                      runtime.settings.limits, 20)
        sent = send_back.send_back(runtime, grant, files, ip="192.0.2.9")
        share_id = share.id
        assert sent.via == "portal"
    finally:
        runtime.db.close()

    lines = ok(cfg, "shares", "audit", str(share_id)).splitlines()
    assert any(f"documents returned  by {DOCTOR}  recipient {DOCTOR}  from 192.0.2.9" in line
               for line in lines), lines
    assert any(f"grant created  by {DOCTOR}  recipient {MEMBER}" in line for line in lines)
