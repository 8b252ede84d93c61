"""Auto-replies, bounces, lists and loops are dropped silently; people's mail goes through."""

from __future__ import annotations

import csv
import email
import email.policy
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from mailbridge.mail.screen import screen
from mailbridge.outcomes import Ignore
from tests.conftest import CORPUS, MAIL, make_settings

FIXTURES = MAIL
SENDER = "j.alvarez@clinic.example"
TO = ["share@portal.example"]

ORDINARY = """\
From: Jordan Alvarez <j.alvarez@clinic.example>
To: share@portal.example
Subject: Plan of care for review
Date: Thu, 16 May 2024 11:40:56 -0400
Message-ID: <plan-of-care-1@clinic.example>
MIME-Version: 1.0
Content-Type: text/plain; charset="UTF-8"

To: dr.smith@ortho.example

The updated plan of care is attached.
"""


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return make_settings(tmp_path_factory.mktemp("data"))


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def fixture(name: str):
    return parse((FIXTURES / name).read_bytes())


def with_headers(extra: str, base: str = ORDINARY):
    return parse((extra.strip() + "\n" + base).encode())


def reason(msg, cfg, envelope_from: str | None = SENDER) -> str | None:
    outcome = screen(msg, envelope_from, cfg)
    assert outcome is None or isinstance(outcome, Ignore)
    return outcome.reason if outcome else None


# --- what goes through ---------------------------------------------------------------------


def test_ordinary_staff_message_passes(cfg):
    assert reason(parse(ORDINARY.encode()), cfg) is None


def test_google_workspace_message_passes(cfg):
    assert reason(fixture("gmail_ar_dkim_pass.eml"), cfg) is None


def test_outlook_message_with_suppress_header_and_auto_claim_subject_passes(cfg):
    # Outlook's X-Auto-Response-Suppress and an insurer's "Auto:" claim are everyday mail.
    assert reason(fixture("outlook_auto_claim_share.eml"), cfg) is None


@pytest.mark.parametrize("extra", [
    "Auto-Submitted: no",
    "Auto-Submitted: No (a person wrote this)",
    "X-Auto-Response-Suppress: All",
    "X-Auto-Response-Suppress: OOF, DR, RN, NRN, AutoReply",
    "Precedence: first-class",
    "X-Autoreply: no",
])
def test_harmless_headers_pass(cfg, extra):
    assert reason(with_headers(extra), cfg) is None


@pytest.mark.parametrize("subject", [
    "Out of Office",
    "Out of office - back Monday 2 Dec",
    "OOO: Jane Doe",
    "Jane Doe is out of the office",
    "Abwesend: bis 3.12.",
])
def test_suppress_header_with_an_auto_reply_subject_is_ignored(cfg, subject):
    raw = ORDINARY.replace("Subject: Plan of care for review",
                           f"Subject: {subject}\nX-Auto-Response-Suppress: All")
    assert reason(parse(raw.encode()), cfg) == "auto-reply-suppressed"


@pytest.mark.parametrize("subject", ["Out of office visit notes for review",
                                     "Plan of care, patient on vacation next week"])
def test_suppress_header_with_a_persons_subject_passes(cfg, subject):
    raw = ORDINARY.replace("Subject: Plan of care for review",
                           f"Subject: {subject}\nX-Auto-Response-Suppress: All")
    assert reason(parse(raw.encode()), cfg) is None


@pytest.mark.parametrize("subject", [
    "Out of office visit notes for review",
    "Auto accident intake forms",
    "Auto: claim 99 records",
    "Fwd: Automatic reply: lab results",
    "Re: Undeliverable mail to the pharmacy - resending",
])
def test_human_subjects_that_look_similar_pass(cfg, subject):
    raw = ORDINARY.replace("Subject: Plan of care for review", f"Subject: {subject}")
    assert reason(parse(raw.encode()), cfg) is None


# --- what is dropped -----------------------------------------------------------------------


def test_out_of_office_reply_is_ignored_even_by_its_subject_alone(cfg):
    msg = fixture("auto_reply_ooo.eml")
    assert reason(msg, cfg) == "auto-submitted"
    del msg["Auto-Submitted"]
    assert reason(msg, cfg) == "auto-reply-subject"


def test_bounce_is_ignored_by_envelope_header_and_content_type(cfg):
    msg = fixture("bounce_dsn.eml")
    assert reason(msg, cfg, envelope_from="") == "null-sender"
    assert reason(msg, cfg) == "auto-submitted"
    del msg["Auto-Submitted"]
    assert reason(msg, cfg) == "delivery-report"


def test_newsletter_is_ignored(cfg):
    msg = fixture("precedence_bulk.eml")
    assert reason(msg, cfg, envelope_from=msg["Return-Path"].strip("<>")) == "precedence-bulk"
    del msg["Precedence"]
    assert reason(msg, cfg) == "mailing-list"


@pytest.mark.parametrize("envelope_from", ["", "<>"])
def test_null_envelope_sender_is_ignored(cfg, envelope_from):
    assert reason(parse(ORDINARY.encode()), cfg, envelope_from) == "null-sender"


def test_without_envelope_the_return_path_header_decides(cfg):
    assert reason(with_headers("Return-Path: <>"), cfg, envelope_from=None) == "null-sender"
    assert reason(with_headers(f"Return-Path: <{SENDER}>"), cfg, envelope_from=None) is None
    assert reason(parse(ORDINARY.encode()), cfg, envelope_from=None) is None


@pytest.mark.parametrize("from_", [
    "Mailbridge <mailbridge@portal.example>",
    "MAILBRIDGE@Portal.Example",
    "share@portal.example",
    "share+dr.smith=ortho.example@portal.example",
    "reply+5kQ2xv9b@reply.portal.example",
])
def test_our_own_messages_coming_back_are_a_loop(cfg, from_):
    raw = ORDINARY.replace("Jordan Alvarez <j.alvarez@clinic.example>", from_)
    assert reason(parse(raw.encode()), cfg) == "own-address-loop"


def test_our_own_envelope_sender_is_a_loop(cfg):
    assert reason(parse(ORDINARY.encode()), cfg, "mailbridge@portal.example") \
        == "own-address-loop"


def test_other_addresses_at_the_sharing_domain_are_not_a_loop(cfg):
    raw = ORDINARY.replace("j.alvarez@clinic.example", "office@portal.example")
    assert reason(parse(raw.encode()), cfg) is None


@pytest.mark.parametrize(("extra", "expected"), [
    ("Auto-Submitted: auto-replied", "auto-submitted"),
    ("Auto-Submitted: auto-generated", "auto-submitted"),
    ("auto-submitted: Auto-Notified; owner-email=x@clinic.example", "auto-submitted"),
    ("Precedence: bulk", "precedence-bulk"),
    ("Precedence: JUNK", "precedence-junk"),
    ("Precedence: list", "precedence-list"),
    ("X-Autoreply: yes", "auto-reply-header"),
    ("X-Autorespond: Away", "auto-reply-header"),
    ("X-MS-Exchange-Inbox-Rules-Loop: j.alvarez@clinic.example", "auto-reply-header"),
    ("X-Apple-Action: VACATION", "auto-reply-header"),
    ("List-Id: Staff news <news.clinic.example>", "mailing-list"),
    ("List-Unsubscribe: <mailto:leave@lists.clinic.example>", "mailing-list"),
    ("X-Failed-Recipients: dr.smyth@ortho.example", "delivery-report"),
    ("Precedence: auto_reply", "precedence-auto-reply"),
    ("X-Precedence: auto_reply", "precedence-auto-reply"),
    ("X-Precedence: bulk", "precedence-bulk"),
])
def test_each_machine_signal_alone_is_enough(cfg, extra, expected):
    assert reason(with_headers(extra), cfg) == expected


@pytest.mark.parametrize("report_type", ["delivery-status", "disposition-notification"])
def test_reports_are_ignored(cfg, report_type):
    raw = ORDINARY.replace(
        'Content-Type: text/plain; charset="UTF-8"',
        f'Content-Type: multipart/report; report-type={report_type}; boundary="b1"',
    ).replace("To: dr.smith", "--b1\nContent-Type: text/plain\n\nTo: dr.smith") + "--b1--\n"
    assert reason(parse(raw.encode()), cfg) == "delivery-report"


@pytest.mark.parametrize("subject", [
    "Automatic reply: Plan of care",
    "Auto reply: Plan of care",
    "Out of Office: Plan of care",
    "Out of Office AutoReply: Plan of care",
    "Abwesenheitsnotiz: Behandlungsplan",
    "=?utf-8?q?R=C3=A9ponse_automatique_=3A_Plan?=",
    "AUTO: Jane Doe is out of the office (returning 05/20/2024)",
    "Undeliverable: Plan of care",
])
def test_subjects_written_by_mail_systems_are_ignored(cfg, subject):
    raw = ORDINARY.replace("Subject: Plan of care for review", f"Subject: {subject}")
    assert reason(parse(raw.encode()), cfg) in ("auto-reply-subject", "bounce-subject")


def test_mailer_daemon_without_other_signals_is_ignored(cfg):
    raw = ORDINARY.replace("Jordan Alvarez <j.alvarez@clinic.example>",
                           "Mail Delivery System <MAILER-DAEMON@mx.clinic.example>")
    assert reason(parse(raw.encode()), cfg) == "system-sender"


# --- robustness ----------------------------------------------------------------------------


@hsettings(max_examples=200, deadline=None)
@given(st.binary(max_size=800))
def test_never_raises_on_arbitrary_bytes(cfg, data):
    outcome = screen(parse(b"Subject: " + data), SENDER, cfg)
    assert outcome is None or isinstance(outcome, Ignore)


# --- the shared real-world corpus ----------------------------------------------------------


def corpus_files(folder: str) -> list[Path]:
    if not (CORPUS / folder).is_dir():
        return []
    return sorted(p for p in (CORPUS / folder).iterdir() if p.is_file())


def manifest() -> dict[str, str]:
    path = CORPUS / "MANIFEST.tsv"
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as fh:
        return {row["path"]: row["case"] for row in csv.DictReader(fh, delimiter="\t")}


needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason="shared corpus not present")


@needs_corpus
@pytest.mark.parametrize("path", corpus_files("autoreply_bounce"), ids=lambda p: p.name)
def test_corpus_bounces_and_auto_replies_are_ignored(cfg, path):
    # Every file in this folder is a bounce, a receipt or an auto-reply (see MANIFEST.tsv);
    # a normal envelope sender proves the headers alone give them away.
    assert f"autoreply_bounce/{path.name}" in manifest()
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert reason(msg, cfg) is not None


@needs_corpus
@pytest.mark.parametrize("path", corpus_files("forward"), ids=lambda p: p.name)
def test_corpus_forwards_are_not_ignored(cfg, path):
    case = manifest().get(f"forward/{path.name}", "")
    if case.startswith("BODY ONLY"):
        pytest.skip("body-only fragment, not a message")
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert reason(msg, cfg) is None


@needs_corpus
@pytest.mark.parametrize("path", corpus_files("replies"), ids=lambda p: p.name)
def test_corpus_replies_people_wrote_are_not_screened_out(cfg, path):
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert screen(msg, SENDER, cfg) is None
    assert screen(msg, None, cfg) is None


@needs_corpus
@pytest.mark.parametrize("path", corpus_files("malformed"), ids=lambda p: p.name)
def test_corpus_malformed_mail_gets_a_verdict_without_raising(cfg, path):
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    for envelope_from in (SENDER, None):
        verdict = screen(msg, envelope_from, cfg)
        assert verdict is None or (isinstance(verdict, Ignore) and verdict.reason)

