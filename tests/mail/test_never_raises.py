"""The mail-reading layer's promise, for every entry point that reads untrusted mail: a value or
a typed outcome, never an exception, and only text that can be stored and mailed.

Every finding `scripts/fuzz` kept (tests/fixtures/fuzz/) and every mail fixture is replayed
here, and Hypothesis damages real messages the way the fuzzer does, so a machine without
atheris still checks the promise (tests/untrusted.py holds the entry points and the checks).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from mailbridge.mail import dsn
from tests import untrusted
from tests.conftest import CORPUS, MAIL
from tests.mail_mutations import FRAGMENTS, mutate

MAX_LEN = 16 * 1024
KEPT = sorted(untrusted.CRASHES.glob("*.eml")) + sorted(MAIL.glob("*.eml"))
SEEDS = [p.read_bytes()[:MAX_LEN] for p in untrusted.seed_files(CORPUS)]
BOUNDED = settings(max_examples=80, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("path", KEPT, ids=[f"{p.parent.name}/{p.name}" for p in KEPT])
def test_every_kept_finding_and_fixture_keeps_the_promise(path):
    untrusted.check(path.read_bytes())


def test_a_finding_in_the_fuzz_folder_is_replayed():
    assert any(p.parent == untrusted.CRASHES for p in KEPT)


def test_an_entry_point_that_raises_breaks_the_promise(monkeypatch):
    # The check can fail: a reader that raises is reported under its entry point's name.
    def broken(message):
        raise ValueError("embedded null character")
    monkeypatch.setattr(dsn, "failed_recipients", broken)
    with pytest.raises(untrusted.Broken, match="delivery_report: ValueError"):
        untrusted.check((MAIL / "bounce_postfix.eml").read_bytes())


def test_text_that_cannot_be_stored_breaks_the_promise():
    with pytest.raises(untrusted.Broken, match="unstorable title"):
        untrusted.storable("share_request", ["ok", "caf\ud800"], "title")


@BOUNDED
@given(seed=st.integers(min_value=0, max_value=len(SEEDS) - 1),
       rng=st.randoms(use_true_random=False))
def test_damaged_real_messages_keep_the_promise(seed, rng):
    raw = mutate(SEEDS[seed], rng, SEEDS, MAX_LEN)
    note(f"input: {raw[:4000]!r}")
    untrusted.check(raw)


@BOUNDED
@given(pieces=st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=40)),
                       max_size=40))
def test_messages_made_of_mail_fragments_keep_the_promise(pieces):
    untrusted.check(b"".join(pieces))
