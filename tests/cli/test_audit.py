"""`mailbridge audit` and `mailbridge shares audit|hold` as an operator and an auditor use
them: verify exits 0 on an intact trail and 1 naming the first doctored event; an export is
CSV or JSON lines ending with the chain head, and a later verify against that export catches
a trail cut short."""

from __future__ import annotations

import csv
import json
import sqlite3

import pytest

from mailbridge.config import load_settings
from mailbridge.runtime import build_runtime
from mailbridge.shares import records
from mailbridge.store import audit
from mailbridge.store.models import Member, Share
from mailbridge.store.states import Audit
from tests.cli.test_cli import mb, ok
from tests.helpers import MEMBER, MINIMAL_CONFIG


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL_CONFIG)
    ok(path, "init")
    ok(path, "members", "add", MEMBER, "--name", "Jane Doe", "--clinic", "Riverside PT")
    ok(path, "clinics", "set", "Riverside PT", "--timezone", "America/Chicago",
       "--document-retention-days", "2555")
    ok(path, "members", "add", "x@lakeside.example", "--name", "X", "--clinic", "Lakeside PT")
    return path


def database(tmp_path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "data" / "mailbridge.db", isolation_level=None)


def with_share(cfg) -> int:
    runtime = build_runtime(load_settings(cfg, env={}))
    try:
        jane = Member.get(Member.email == MEMBER)
        share = Share.create(clinic=jane.clinic, sender=jane, created_at=runtime.clock(),
                             dedupe_key="k", reply_key_hash="r")
        audit.record(runtime.audit_key, Audit.SHARE_CREATED, runtime.clock(), actor=MEMBER,
                     share=share)
        return share.id
    finally:
        runtime.db.close()


def test_verify_passes_then_names_the_edited_event(cfg, tmp_path):
    out = ok(cfg, "audit", "verify")
    assert out.startswith("audit trail intact: 3 event(s) checked, chain head at 3")
    with database(tmp_path) as db:
        db.execute("UPDATE audit_event SET actor = 'nobody' WHERE seq = 2")
        [event_id] = db.execute("SELECT id FROM audit_event WHERE seq = 2").fetchone()
    result = mb(cfg, "audit", "verify")
    assert result.exit_code == 1
    assert (f"audit trail broken at event id {event_id}: content changed" in result.stderr)
    assert "(1 event(s) before it were intact)" in result.stderr


def test_an_export_is_csv_with_both_times_and_ends_with_the_chain_head(cfg, tmp_path):
    share_id = with_share(cfg)
    target = tmp_path / "trail.csv"
    result = mb(cfg, "audit", "export", "--output", str(target))
    assert result.exit_code == 0 and "4 event(s) written to" in result.stderr
    with target.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == records.FIELDS
    assert [r["kind"] for r in rows] == ["member_added", "clinic_changed", "member_added",
                                         "share_created", "chain head"]
    changed = rows[1]
    assert changed["clinic"] == "Riverside PT" and changed["actor"] == "operator"
    assert json.loads(changed["detail"]) == {"document_retention_days": 2555.0,
                                             "timezone": "America/Chicago"}
    created = rows[3]
    assert created["share"] == str(share_id) and created["time_local"].endswith(("CST", "CDT"))
    assert created["time_utc"].endswith("Z")
    assert rows[-1]["seq"] == "4" and len(rows[-1]["mac"]) == 64


def test_an_export_filters_by_clinic_and_share_as_json_lines(cfg):
    share_id = with_share(cfg)
    lines = ok(cfg, "audit", "export", "--clinic", "Lakeside PT", "--format", "jsonl")
    *events, head = [json.loads(line) for line in lines.splitlines()]
    assert [e["kind"] for e in events] == ["member_added"]
    assert events[0]["actor"] == "operator" and events[0]["clinic"] == "Lakeside PT"
    assert head == {"chain_head_seq": 4, "chain_head_mac": head["chain_head_mac"]}
    lines = ok(cfg, "audit", "export", "--share", str(share_id), "--format", "jsonl")
    assert [json.loads(line).get("kind") for line in lines.splitlines()] == [
        "share_created", None]
    assert ok(cfg, "audit", "export", "--since", "2999-01-01").count("\n") == 2


def test_a_trail_cut_short_since_an_export_is_caught_against_it(cfg, tmp_path):
    with_share(cfg)
    exported = tmp_path / "trail.jsonl"
    ok(cfg, "audit", "export", "--format", "jsonl", "--output", str(exported))
    # Cut the newest events (the share's and the export's own) and rewind the head to match.
    with database(tmp_path) as db:
        db.execute("DELETE FROM audit_event WHERE seq >= 4")
        [mac] = db.execute("SELECT mac FROM audit_event WHERE seq = 3").fetchone()
        db.execute("UPDATE audit_head SET seq = 3, mac = ?", (mac,))
    assert ok(cfg, "audit", "verify").startswith("audit trail intact: 3 event(s)")
    result = mb(cfg, "audit", "verify", "--against", str(exported))
    assert result.exit_code == 1 and "the exported head (event 4)" in result.stderr
    head = json.loads(exported.read_text().splitlines()[-1])
    result = mb(cfg, "audit", "verify", "--head",
                f"{head['chain_head_seq']}:{head['chain_head_mac']}")
    assert result.exit_code == 1


def test_verify_against_a_csv_export_passes_while_the_trail_grows(cfg, tmp_path):
    exported = tmp_path / "trail.csv"
    ok(cfg, "audit", "export", "--output", str(exported))
    with_share(cfg)
    out = ok(cfg, "audit", "verify", "--against", str(exported))
    assert out.startswith("audit trail intact: 5 event(s)")  # with the export's own event


def test_an_export_is_itself_recorded(cfg, tmp_path):
    ok(cfg, "audit", "export", "--clinic", "Riverside PT", "--since", "2026-01-01",
       "--output", str(tmp_path / "x.csv"))
    lines = ok(cfg, "audit", "export", "--format", "jsonl").splitlines()
    exported = json.loads(lines[-2])
    assert exported["kind"] == "audit_exported" and exported["actor"] == "operator"
    assert exported["clinic"] == "Riverside PT"
    assert json.loads(exported["detail"]) == {"events": 2, "format": "csv",
                                              "since": "2026-01-01"}


@pytest.mark.parametrize(("args", "option"), [
    (["verify", "--head", "12:short"], "--head"),
    (["verify", "--against", "missing.csv"], "--against"),
    (["export", "--clinic", "Nowhere"], "--clinic"),
    (["export", "--since", "last tuesday"], "--since"),
    (["export", "--until", "2026-13-01"], "--until"),
])
def test_mistakes_name_the_option(cfg, args, option):
    result = mb(cfg, "audit", *args)
    assert result.exit_code == 2 and f"Invalid value for {option}:" in result.stderr


def test_shares_audit_and_hold(cfg):
    share_id = with_share(cfg)
    assert "legal hold on" in ok(cfg, "shares", "hold", str(share_id))
    assert "(already)" in ok(cfg, "shares", "hold", str(share_id))
    assert "legal hold: on" in ok(cfg, "shares", "show", str(share_id))
    assert "legal hold released" in ok(cfg, "shares", "hold", str(share_id), "--release")
    lines = ok(cfg, "shares", "audit", str(share_id)).splitlines()
    assert [line.split("  ")[1] for line in lines] == [
        "share created", "legal hold set", "legal hold released"]
    assert "by operator" in lines[1] and lines[0].split("  ")[0].endswith(("CST", "CDT"))
    result = mb(cfg, "shares", "audit", "999")
    assert result.exit_code == 2 and "no share #999" in result.stderr
