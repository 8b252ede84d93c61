"""`mailbridge clinics`: a clinic's own policy, validated with errors naming the option, and
what it changes: the deadline of a new share, the reminder window, the name in our From."""

from __future__ import annotations

import datetime as dt

import pytest

from mailbridge.outbound import outbox
from mailbridge.receive import spool, worker
from mailbridge.shares import clinics, jobs
from mailbridge.store.models import Grant, OutboundMessage
from tests.cli.test_cli import mb, ok
from tests.helpers import MEMBER, MINIMAL_CONFIG, add_jane, share_message
from tests.shares.test_notify import configured


@pytest.fixture
def cfg(tmp_path):
    """An initialised installation's config file."""
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL_CONFIG)
    ok(path, "init")
    return path


def test_add_show_set_and_list(cfg):
    out = ok(cfg, "clinics", "add", "Riverside PT", "--timezone", "America/Chicago",
             "--contact", "Front desk: (555) 010-0200", "--display-name", "Riverside Physical "
             "Therapy", "--document-retention-days", "2555")
    assert "timezone: America/Chicago" in out
    assert "claim hours: 24 (configuration)" in out
    assert "document retention: 2555 days" in out
    assert "contact: Front desk: (555) 010-0200" in out
    out = ok(cfg, "clinics", "set", "Riverside PT", "--claim-hours", "48", "--legal-hold")
    assert "claim hours: 48\n" in out and "legal hold: on" in out
    assert ok(cfg, "clinics", "show", "Riverside PT") == out
    [line] = ok(cfg, "clinics", "list").splitlines()
    assert line == "Riverside PT\tAmerica/Chicago\t0 active member(s)\tlegal hold"


def test_watermark_on_off_and_back_to_the_configuration(cfg):
    ok(cfg, "clinics", "add", "Riverside PT")
    assert "watermark: off (configuration)" in ok(cfg, "clinics", "show", "Riverside PT")
    assert "watermark: on\n" in ok(cfg, "clinics", "set", "Riverside PT", "--watermark", "on")
    out = ok(cfg, "clinics", "set", "Riverside PT", "--watermark", "configuration")
    assert "watermark: off (configuration)" in out
    refused = mb(cfg, "clinics", "set", "Riverside PT", "--watermark", "maybe")
    assert refused.exit_code != 0 and "--watermark" in refused.output


@pytest.mark.parametrize(("args", "option"), [
    (["add", "X", "--timezone", "Mars/Olympus"], "--timezone"),
    (["add", "X", "--claim-hours", "0"], "--claim-hours"),
    (["add", "X", "--claim-hours", "nan"], "--claim-hours"),
    (["add", "X", "--remind-before-hours", "-1"], "--remind-before-hours"),
    (["add", "X", "--document-retention-days", "-3"], "--document-retention-days"),
    (["add", "X", "--contact", "x" * 201], "--contact"),
    (["add", " "], "NAME"),
    (["set", "Nowhere", "--claim-hours", "2"], "NAME"),
    (["show", "Nowhere"], "NAME"),
])
def test_mistakes_name_the_option(cfg, args, option):
    result = mb(cfg, "clinics", *args)
    assert result.exit_code == 2
    assert f"'{option}'" in result.output or f"Invalid value for {option}" in result.output


def test_a_second_clinic_of_the_same_name_is_refused(cfg):
    ok(cfg, "clinics", "add", "Riverside PT")
    result = mb(cfg, "clinics", "add", "Riverside  PT")
    assert result.exit_code == 2 and "already a clinic named 'Riverside PT'" in result.output


def share(rt) -> None:
    spool.enqueue(rt, bytes(share_message()), channel="smtp", envelope_from=MEMBER,
                  envelope_to=["share@portal.example"])
    assert worker.run_once(rt, "test")


def test_a_clinics_claim_hours_set_the_deadline_and_its_name_our_from(runtime):
    rt = configured(runtime)
    member = add_jane()
    clinics.change(member.clinic, clinics.Changes(claim_hours=6, display_name="Riverside PT"))
    share(rt)
    grant = Grant.get()
    assert grant.deadline == rt.clock() + dt.timedelta(hours=6)
    link = OutboundMessage.get(OutboundMessage.kind == "link")
    assert b"From: Riverside PT via mailbridge" in outbox.open_message(rt, link)


def test_reminders_follow_each_clinics_window(runtime):
    rt = configured(runtime)
    member = add_jane()
    share(rt)
    clinics.change(member.clinic, clinics.Changes(remind_before_hours=0))  # none here
    rt.clock.advance(hours=21)
    assert jobs.remind_grants(rt) == 0
    clinics.change(member.clinic, clinics.Changes(remind_before_hours=4))
    assert jobs.remind_grants(rt) == 1
