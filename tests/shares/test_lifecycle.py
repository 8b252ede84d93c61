"""Revoke, resend, extend and the status report: what recipients can still open afterwards, what
they are told, and what the sender reads — on SQLite and PostgreSQL, with a clock the test moves."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
from email import policy
from email.parser import BytesParser

import pytest

from mailbridge.outbound import outbox
from mailbridge.shares import lifecycle
from mailbridge.store import tokens
from mailbridge.store.models import AuditEvent, Grant, OutboundMessage
from tests.helpers import MINIMAL_CONFIG
from tests.portal_helpers import (
    START,
    claim,
    make_account,
    make_app,
    make_share,
    portal_runtime,
    signed_in_client,
)

SMITH = "dr.smith@ortho.example"
JONES = "dr.jones@ortho.example"
LEE = "lee@law.example"
TITLE = "POC for Rosalind Tuckerman"
FILENAME = "tuckerman-plan-of-care.pdf"
NOTE = "<p>SECRET-NOTE-4411</p>"


@pytest.fixture
def rt(runtime):
    return portal_runtime(runtime)


def new_share(rt, recipients=(SMITH, JONES), hours: float = 24):
    from tests.helpers import pdf_bytes

    return make_share(rt, recipients=recipients, title=TITLE, note_html=NOTE, hours=hours,
                      documents=[(FILENAME, "pdf", "application/pdf", pdf_bytes("p", 3000))])


def with_settings(rt, section: str, **values):
    s = rt.settings
    changed = dataclasses.replace(getattr(s, section), **values)
    return dataclasses.replace(rt, settings=dataclasses.replace(s, **{section: changed}))


def grant(share, address) -> Grant:
    return Grant.get((Grant.share == share) & (Grant.address == address))


def queued(kind: str) -> list[OutboundMessage]:
    return list(OutboundMessage.select().where(OutboundMessage.kind == kind)
                .order_by(OutboundMessage.id))


def opened(rt, row: OutboundMessage):
    return BytesParser(policy=policy.default).parsebytes(outbox.open_message(rt, row))


def body(rt, row: OutboundMessage) -> str:
    msg = opened(rt, row)
    return " ".join(msg.get_body(("plain",)).get_content().split())


def events(kind: str) -> list[AuditEvent]:
    return list(AuditEvent.select().where(AuditEvent.kind == kind).order_by(AuditEvent.id))


# --- revoke ------------------------------------------------------------------------------------


def test_revoke_withdraws_every_live_grant_and_tells_each_recipient(rt):
    share, _ = new_share(rt)
    claim(rt, share, SMITH, make_account(rt, SMITH))
    rt.clock.advance(minutes=5)
    result = lifecycle.revoke(rt, share, actor="jane.doe@clinic.example")
    assert result.changed == (SMITH, JONES)
    assert result.summary == "Access withdrawn from 2 recipients."
    for address in (SMITH, JONES):
        g = grant(share, address)
        assert g.state == "revoked" and g.ended_at == START + dt.timedelta(minutes=5)
    assert [e.actor for e in events("grant_revoked")] == ["jane.doe@clinic.example"] * 2
    assert len(events("share_revoked")) == 1
    assert sorted(r.to_addr for r in queued("revoked")) == [JONES, SMITH]


def test_revoking_one_recipient_leaves_the_others(rt):
    share, _ = new_share(rt)
    result = lifecycle.revoke(rt, share, address="Dr Jones <Dr.Jones@Ortho.example>",
                              actor="cli")
    assert result.changed == (JONES,)
    assert grant(share, JONES).state == "revoked" and grant(share, SMITH).state == "pending"
    assert [r.to_addr for r in queued("revoked")] == [JONES]
    assert events("share_revoked") == []
    assert events("grant_revoked")[0].actor == "cli"


def test_revoking_an_address_not_on_the_share_changes_nothing(rt):
    share, _ = new_share(rt)
    result = lifecycle.revoke(rt, share, address="someone@else.example", actor="cli")
    assert result.changed == ()
    assert "someone@else.example is not a recipient" in result.summary
    assert {g.state for g in share.grants} == {"pending"}
    assert queued("revoked") == [] and events("grant_revoked") == []


def test_revoke_again_says_already_revoked_and_sends_nothing_more(rt):
    share, _ = new_share(rt)
    lifecycle.revoke(rt, share, actor="cli")
    rt.clock.advance(hours=1)
    again = lifecycle.revoke(rt, share, actor="cli")
    assert again.changed == ()
    assert again.summary.startswith("Already revoked")
    assert all("already revoked" in line for line in again.lines)
    assert len(queued("revoked")) == 2 and len(events("grant_revoked")) == 2
    assert {g.ended_at for g in share.grants} == {START}  # the first revocation's time stays


def test_an_expired_link_stays_expired_when_the_share_is_revoked(rt):
    share, _ = new_share(rt, hours=1)
    claim(rt, share, SMITH, make_account(rt, SMITH))
    rt.clock.advance(hours=2)  # Jones's link lapsed; the expiry job has not run yet
    result = lifecycle.revoke(rt, share, actor="cli")
    assert result.changed == (SMITH,)
    assert grant(share, JONES).state == "pending"  # still decided as expired at read time
    assert [r.to_addr for r in queued("revoked")] == [SMITH]
    assert any(JONES in line and "expired" in line for line in result.lines)


def test_revocation_stops_the_next_request_even_after_viewing(rt):
    share, links = new_share(rt)
    smith = make_account(rt, SMITH)
    claim(rt, share, SMITH, smith)
    app = make_app(rt)
    browser = signed_in_client(app, rt, smith)
    document = share.documents.get()
    assert browser.get(f"/documents/{document.id}").status_code == 200
    assert browser.get(f"/documents/{document.id}/inline").status_code == 200
    assert FILENAME in browser.get("/library").get_data(as_text=True)

    lifecycle.revoke(rt, share, actor="cli")

    for path in (f"/documents/{document.id}", f"/documents/{document.id}/inline",
                 f"/documents/{document.id}/download"):
        assert browser.get(path).status_code == 404, path
    assert FILENAME not in browser.get("/library").get_data(as_text=True)
    for address in (SMITH, JONES):  # claimed or not, the link page says so
        page = app.test_client().get(f"/s/{links[address]}")
        assert "Access was revoked" in page.get_data(as_text=True)
    refused = events("access_denied")
    assert refused and {e.detail["reason"] for e in refused} == {"revoked"}


def test_the_revoked_recipient_notice_carries_no_phi(rt):
    share, _ = new_share(rt, recipients=(SMITH,))
    lifecycle.revoke(rt, share, actor="cli")
    [row] = queued("revoked")
    msg = opened(rt, row)
    text = body(rt, row)
    assert "Jane Doe at Riverside PT has withdrawn access to documents shared with you" in text
    raw = outbox.open_message(rt, row).decode("utf-8", "replace")
    for secret in ("Tuckerman", "tuckerman", "POC", ".pdf", "SECRET-NOTE", "plan-of-care"):
        assert secret not in raw
    assert msg["To"] == SMITH and msg["Auto-Submitted"] == "auto-generated"
    assert row.grant_id == grant(share, SMITH).id


def test_recipient_notice_can_be_switched_off(rt):
    rt = with_settings(rt, "notifications", recipient_revoked=False)
    share, _ = new_share(rt)
    assert lifecycle.revoke(rt, share, actor="cli").changed == (SMITH, JONES)
    assert queued("revoked") == []


# --- resend ------------------------------------------------------------------------------------


def test_resend_gives_unclaimed_recipients_a_new_link_and_kills_the_old_one(rt):
    share, links = new_share(rt, recipients=(SMITH, JONES, LEE, "gone@x.example"), hours=1)
    claim(rt, share, SMITH, make_account(rt, SMITH))
    lifecycle.revoke(rt, share, address="gone@x.example", actor="cli")
    Grant.update(reminded_at=START).where(Grant.address == JONES).execute()
    rt.clock.advance(hours=2)  # LEE's and JONES's links have lapsed
    Grant.update(state="expired", ended_at=rt.clock(),
                 expiry_reported_at=rt.clock()).where(Grant.address == LEE).execute()

    result = lifecycle.resend(rt, share, actor="jane.doe@clinic.example")

    assert result.changed == (JONES, LEE)
    deadline = rt.clock() + dt.timedelta(hours=rt.settings.shares.claim_hours)
    for address in (JONES, LEE):
        g = grant(share, address)
        assert g.state == "pending" and g.deadline == deadline and g.ended_at is None
        assert g.reminded_at is None and g.expiry_reported_at is None
        assert g.delivery == "queued"
    assert grant(share, SMITH).state == "claimed"
    assert grant(share, "gone@x.example").state == "revoked"
    assert [r.to_addr for r in queued("link")] == [JONES, LEE]
    assert len(events("links_resent")) == 2

    app = make_app(rt)
    for row in queued("link"):
        token = re.search(r"/s/([A-Za-z0-9_-]{43})", body(rt, row)).group(1)
        assert grant(share, row.to_addr).token_hash == tokens.hash_token(token)
        page = app.test_client().get(f"/s/{token}")
        assert page.status_code == 200 and "Continue" in page.get_data(as_text=True)
        old = app.test_client().get(f"/s/{links[row.to_addr]}")
        assert old.status_code == 404 and "not valid" in old.get_data(as_text=True)
        for secret in ("Tuckerman", ".pdf", "SECRET-NOTE"):
            assert secret not in outbox.open_message(rt, row).decode("utf-8", "replace")


def test_resend_to_one_address_and_nothing_to_resend(rt):
    share, _ = new_share(rt)
    assert lifecycle.resend(rt, share, address=JONES, actor="cli").changed == (JONES,)
    assert [r.to_addr for r in queued("link")] == [JONES]
    claim(rt, share, SMITH, make_account(rt, SMITH))
    claim(rt, share, JONES, make_account(rt, JONES))
    nothing = lifecycle.resend(rt, share, actor="cli")
    assert nothing.summary == "No unclaimed recipients to resend to."
    assert len(queued("link")) == 1
    assert "not a recipient" in lifecycle.resend(rt, share, address=LEE, actor="cli").summary


# --- extend ------------------------------------------------------------------------------------


def test_extend_moves_only_pending_deadlines_by_claim_hours(rt):
    share, _ = new_share(rt, recipients=(SMITH, JONES, LEE), hours=4)
    claim(rt, share, SMITH, make_account(rt, SMITH))
    Grant.update(state="expired", ended_at=START).where(Grant.address == LEE).execute()
    Grant.update(reminded_at=START).where(Grant.address == JONES).execute()
    rt.clock.advance(hours=1)
    result = lifecycle.extend(rt, share, actor="cli")
    assert result.changed == (JONES,)
    jones = grant(share, JONES)
    assert jones.deadline == START + dt.timedelta(hours=4 + rt.settings.shares.claim_hours)
    assert jones.reminded_at is None
    assert grant(share, SMITH).deadline == START + dt.timedelta(hours=4)
    assert grant(share, LEE).state == "expired"
    assert any(LEE in line and "resend" in line for line in result.lines)
    [event] = events("deadline_extended")
    assert event.grant_id == jones.id and event.actor == "cli"


def test_extend_is_capped_and_rejects_nonsense(rt):
    share, _ = new_share(rt, recipients=(SMITH,))
    result = lifecycle.extend(rt, share, hours=10_000, actor="cli")
    cap = rt.settings.shares.max_extend_hours
    assert grant(share, SMITH).deadline == START + dt.timedelta(hours=24 + cap)
    assert f"extended by {cap:g} hours (the most allowed)" in result.summary
    for bad in (0, -3, float("nan")):
        with pytest.raises(lifecycle.LifecycleError, match="hours"):
            lifecycle.extend(rt, share, hours=bad, actor="cli")


def test_extend_after_the_deadline_does_not_revive_the_link(rt):
    share, _ = new_share(rt, recipients=(SMITH,), hours=1)
    rt.clock.advance(hours=1, seconds=1)
    assert lifecycle.extend(rt, share, hours=5, actor="cli").changed == ()
    assert grant(share, SMITH).deadline == START + dt.timedelta(hours=1)


# --- status ------------------------------------------------------------------------------------


def test_status_report_tells_each_recipients_story_in_the_clinic_time_zone(rt):
    share, links = new_share(rt, recipients=(SMITH, JONES, LEE))
    document = share.documents.get()
    # Link e-mails sent at 12:00:30 UTC (07:00 in New York, the clinic's zone).
    lifecycle.resend(rt, share, actor="cli")
    rt.clock.advance(seconds=30)
    for row in queued("link"):
        outbox.mark_sent(rt, row)
    tokens_now = {row.to_addr: re.search(r"/s/([A-Za-z0-9_-]{43})", body(rt, row)).group(1)
                  for row in queued("link")}
    Grant.update(delivery="sent").where(Grant.address != LEE).execute()
    Grant.update(delivery="failed").where(Grant.address == LEE).execute()
    app = make_app(rt)
    rt.clock.advance(minutes=10)  # 07:10: a mail scanner fetches both links (GET and HEAD)
    for token in (tokens_now[SMITH], tokens_now[JONES]):
        scanner = app.test_client()
        for method in (scanner.get, scanner.head, scanner.get):
            method(f"/s/{token}", headers={"User-Agent": "SafeLinks/1.0"})
    rt.clock.advance(minutes=5)  # 07:15: Smith presses Continue in a browser
    person = app.test_client()
    person.get(f"/s/{tokens_now[SMITH]}")
    person.post(f"/s/{tokens_now[SMITH]}/continue")
    rt.clock.advance(minutes=15)  # 07:30
    smith = make_account(rt, SMITH)
    claim(rt, share, SMITH, smith)
    browser = signed_in_client(app, rt, smith)
    rt.clock.advance(minutes=5)  # 07:35
    browser.get(f"/documents/{document.id}/inline")
    rt.clock.advance(minutes=5)  # 07:40
    browser.get(f"/documents/{document.id}/inline")
    browser.get(f"/documents/{document.id}/download")
    rt.clock.advance(minutes=2)  # 07:42: someone signed in as another address tries it
    intruder = signed_in_client(app, rt, make_account(rt, LEE))
    assert intruder.get(f"/s/{tokens_now[SMITH]}/next").status_code == 403
    rt.clock.advance(minutes=58)  # 08:40
    lifecycle.revoke(rt, share, address=SMITH, actor="cli")

    report = lifecycle.status_report(rt, share)
    smith_part = report.split(f"{SMITH}:")[1].split("\n\n")[0]
    assert report.startswith(f'Share "{TITLE}" from Jane Doe, Sat 28 Nov 2026, 07:00 EST')
    assert FILENAME in report and "America/New_York" in report
    assert smith_part.startswith(" revoked")
    for expected in ("  link sent: Sat 28 Nov 2026, 07:00 EST\n",
                     "  delivered to relay: yes\n",
                     "  opened in a browser: Sat 28 Nov 2026, 07:15 EST\n",
                     # Its repeated fetches are one audit event an hour (links.py).
                     "  link fetched by a mail system: Sat 28 Nov 2026, 07:10 EST\n",
                     "  claimed: Sat 28 Nov 2026, 07:30 EST\n",
                     f"  viewed {FILENAME}: Sat 28 Nov 2026, 07:35 EST, 2 times, last Sat 28 "
                     "Nov 2026, 07:40 EST\n",
                     f"  downloaded {FILENAME}: Sat 28 Nov 2026, 07:40 EST\n",
                     "  refused: someone signed in as another address tried this link at Sat "
                     "28 Nov 2026, 07:42 EST\n",
                     "  revoked: Sat 28 Nov 2026, 08:40 EST"):
        assert expected in smith_part + "\n", expected
    assert LEE not in smith_part  # who tried is for the audit trail, not for the report
    jones_part = report.split(f"{JONES}:")[1].split("\n\n")[0]
    # Fetched by a scanner only: not opened.
    assert jones_part.startswith(" pending") and "opened in a browser: not yet" in jones_part
    assert "link fetched by a mail system: Sat 28 Nov 2026, 07:10 EST\n" in jones_part + "\n"
    assert "can be claimed until: Sun 29 Nov 2026, 07:00 EST" in jones_part
    lee_part = report.split(f"{LEE}:")[1]
    assert "delivered to relay: no" in lee_part
    rt.clock.advance(days=2)
    assert f"{JONES}: expired" in lifecycle.status_report(rt, share)



# --- the same operations for operators: `mailbridge shares ...` ----------------------------------



@pytest.fixture
def operator(tmp_path, monkeypatch):
    """A configured installation with one share (Smith and Jones); returns (run, share id)."""
    from click.testing import CliRunner

    from mailbridge.cli import cli
    from mailbridge.config import load_settings
    from mailbridge.runtime import build_runtime

    for name in [n for n in os.environ if n.startswith("MAILBRIDGE_")]:
        monkeypatch.delenv(name)
    cfg = tmp_path / "config.toml"
    cfg.write_text(MINIMAL_CONFIG)

    def run(*args: str):
        return CliRunner().invoke(cli, ["--config", str(cfg), *args])

    assert run("init").exit_code == 0
    rt = build_runtime(load_settings(cfg))
    share, _ = new_share(rt)
    share_id = share.id
    rt.db.close()
    return run, share_id, rt


def test_cli_status_prints_exactly_the_emailed_report(operator):
    run, share_id, rt = operator
    result = run("shares", "status", str(share_id))
    assert result.exit_code == 0, result.output
    from mailbridge.store.models import Share

    assert result.output == lifecycle.status_report(rt, Share.get_by_id(share_id))
    assert f"{SMITH}: pending" in result.output


def test_cli_revoke_resend_extend_act_as_the_operator(operator):
    run, share_id, _ = operator
    revoked = run("shares", "revoke", str(share_id), "--recipient", JONES.upper())
    assert revoked.exit_code == 0 and f"Access withdrawn from {JONES}" in revoked.output
    assert Grant.get(Grant.address == JONES).state == "revoked"
    assert Grant.get(Grant.address == SMITH).state == "pending"
    assert events("grant_revoked")[0].actor == "cli"
    resent = run("shares", "resend", str(share_id))
    assert resent.exit_code == 0 and "New links sent to 1 recipient" in resent.output
    assert f"{JONES}: access was revoked; no new link sent" in resent.output
    extended = run("shares", "extend", str(share_id), "--hours", "12")
    assert extended.exit_code == 0 and "1 unclaimed link extended by 12 hours" in extended.output
    assert [e.actor for e in events("deadline_extended")] == ["cli"]


@pytest.mark.parametrize("args, named", [
    (("revoke", "999"), "ID"),
    (("status", "x"), "ID"),
    (("revoke", "{id}", "--recipient", "nobody@else.example"), "--recipient"),
    (("resend", "{id}", "--recipient", "nobody@else.example"), "--recipient"),
    (("extend", "{id}", "--hours", "0"), "--hours"),
    (("extend", "{id}", "--hours", "soon"), "--hours"),
])
def test_cli_errors_name_the_argument(operator, args, named):
    run, share_id, _ = operator
    result = run("shares", *(a.format(id=share_id) for a in args))
    assert result.exit_code == 2 and named in result.output, result.output
    assert {g.state for g in Grant.select()} == {"pending"}
