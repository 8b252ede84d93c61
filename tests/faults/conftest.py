"""Fixtures of the fault tests: a site (PostgreSQL database, SMTP sink, configuration) whose
`serve` processes are killed and whose database is dropped at the end."""

from __future__ import annotations

import pytest

from tests.faults.harness import Site, postgres_or_skip
from tests.smtp_sink import SmtpSink


@pytest.fixture
def postgres():
    db = postgres_or_skip()
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
