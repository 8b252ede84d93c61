"""The audit trail as an auditor reads it: one share's history, a clinic's, a time range,
each event with its time in the clinic's zone and in UTC, the recipient, the document by name
and where the request came from — in chain order, a page at a time."""

from __future__ import annotations

import datetime as dt

from mailbridge.shares import records
from mailbridge.store import audit
from mailbridge.store.models import Clinic, Member
from mailbridge.store.states import Audit
from tests.portal_helpers import (
    claim,
    make_account,
    make_app,
    make_share,
    portal_runtime,
    signed_in_client,
)

SMITH = "dr.smith@ortho.example"


def viewed_share(rt):
    """A share whose recipient opened its document from 203.0.113.9."""
    share, _ = make_share(rt, recipients=(SMITH,),
                          documents=None)
    audit.record(rt.audit_key, Audit.SHARE_CREATED, rt.clock(), actor="jane.doe@clinic.example",
                 share=share)
    account = make_account(rt, SMITH)
    claim(rt, share, SMITH, account)
    document = share.documents.get()
    client = signed_in_client(make_app(rt), rt, account)
    answer = client.get(f"/documents/{document.id}/download",
                        headers={"User-Agent": "Firefox/140"},
                        environ_base={"REMOTE_ADDR": "203.0.113.9"})
    assert answer.status_code == 200
    return share


def test_a_shares_history_names_recipient_document_place_and_both_times(runtime):
    rt = portal_runtime(runtime)  # 2026-11-28 12:00 UTC; the clinic is in New York
    share = viewed_share(rt)
    rows = list(records.rows(rt, records.Selection(share_id=share.id)))
    assert [r["kind"] for r in rows] == ["share_created", "document_downloaded"]
    created, downloaded = rows
    assert created["actor"] == "jane.doe@clinic.example" and created["recipient"] == ""
    assert downloaded["recipient"] == SMITH
    assert downloaded["document"] == "plan-of-care.pdf"
    assert (downloaded["ip"], downloaded["user_agent"]) == ("203.0.113.9", "Firefox/140")
    assert downloaded["time_utc"] == "2026-11-28T12:00:00Z"
    assert downloaded["time_local"].startswith("Sat 28 Nov 2026, 07:00")
    assert downloaded["clinic"] == "Riverside PT" and downloaded["share"] == share.id
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)
    assert all(len(r["mac"]) == 64 for r in rows)


def test_a_clinic_sees_only_its_own_events(runtime):
    rt = portal_runtime(runtime)
    ours = viewed_share(rt)
    other = Clinic.create(name="Lakeside PT", created_at=rt.clock(), timezone="UTC")
    stranger = Member.create(email="x@lakeside.example", name="X", clinic=other,
                             created_at=rt.clock())
    audit.record(rt.audit_key, Audit.MEMBER_ADDED, rt.clock(), actor="operator",
                 member=stranger)
    audit.record(rt.audit_key, Audit.CLINIC_CHANGED, rt.clock(), actor="operator",
                 clinic=other, detail={"legal_hold": True})
    mine = list(records.rows(rt, records.Selection(clinic=ours.clinic)))
    theirs = list(records.rows(rt, records.Selection(clinic=other)))
    assert {r["clinic"] for r in mine} == {"Riverside PT"} and len(mine) == 2
    assert [r["kind"] for r in theirs] == ["member_added", "clinic_changed"]
    assert theirs[1]["clinic"] == "Lakeside PT"
    assert theirs[0]["time_local"].startswith("Sat 28 Nov 2026, 12:00")


def test_a_time_range_reads_page_after_page_in_chain_order(runtime, monkeypatch):
    rt = portal_runtime(runtime)
    start = rt.clock()
    for hour in range(7):
        audit.record(rt.audit_key, Audit.MEMBER_ADDED, start + dt.timedelta(hours=hour))
    monkeypatch.setattr(records, "PAGE", 2)
    selection = records.Selection(since=start + dt.timedelta(hours=1),
                                  until=start + dt.timedelta(hours=6))
    rows = list(records.rows(rt, selection))
    assert [r["time_utc"][11:13] for r in rows] == ["13", "14", "15", "16", "17"]
    assert records.count(selection) == 5
    assert records.chain_head()["chain_head_seq"] == 7
