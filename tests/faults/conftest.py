"""Fixtures of the fault tests: a site (PostgreSQL database, SMTP sink, configuration) whose
`serve` processes are killed and whose database is dropped at the end."""

from __future__ import annotations

import os

import pytest

from tests.faults.harness import Postgres, Site
from tests.smtp_sink import SmtpSink


@pytest.fixture
def postgres():
    try:
        db = Postgres()
    except Exception as exc:  # noqa: BLE001 - any failure means "no server here"
        if os.environ.get("MAILBRIDGE_TEST_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL not reachable: {exc}")
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    yield db
    db.drop()


@pytest.fixture
def site(tmp_path, postgres):
    with SmtpSink() as sink:
        made = Site(tmp_path, postgres, sink)
        made.write_config()
        made.init()
        yield made
        made.kill_all()
