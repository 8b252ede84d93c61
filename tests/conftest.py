"""Shared fixtures: settings in a temporary directory, a database per test (SQLite and
PostgreSQL), a runtime, a real SMTP sink as the relay, and the running service."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import peewee
import pytest

from mailbridge.clock import system_clock
from mailbridge.config import load_settings, read_master_key
from mailbridge.runtime import build_runtime
from mailbridge.settings import Settings
from mailbridge.store import schema
from tests.ports import free_port  # noqa: F401 (imported from here by tests)

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
MAIL = ROOT / "tests" / "fixtures" / "mail"

SHARING = "share@portal.example"
REPLY_DOMAIN = "reply.portal.example"
OUTBOUND_FROM = "mailbridge@portal.example"

PG_ADMIN_URL = os.environ.get("MAILBRIDGE_TEST_POSTGRES",
                              "postgresql://postgres@127.0.0.1:5432/postgres")


def make_settings(data_dir: Path, db_url: str = "", **env: str) -> Settings:
    values = {
        "MAILBRIDGE_SERVICE_BASE_URL": "http://portal.example",
        "MAILBRIDGE_SERVICE_DATA_DIR": str(data_dir),
        "MAILBRIDGE_DATABASE_URL": db_url,
        "MAILBRIDGE_ADDRESSES_SHARING": SHARING,
        "MAILBRIDGE_ADDRESSES_REPLY_DOMAIN": REPLY_DOMAIN,
        "MAILBRIDGE_OUTBOUND_FROM": OUTBOUND_FROM,
        "MAILBRIDGE_SENDERS_TRUSTED_AUTHSERV_IDS": "mx.portal.example",
        "MAILBRIDGE_WORKER_POLL_SECONDS": "0.5",
        # The test relay is a plain aiosmtpd sink on loopback.
        "MAILBRIDGE_OUTBOUND_SMTP_TLS": "none",
        # Services of tests running side by side must not meet on the default 9464.
        "MAILBRIDGE_METRICS_PORT": "0",
    }
    values.update(env)
    return load_settings(None, env=values)


# --- databases -------------------------------------------------------------------------------


def _pg_connect(url: str) -> peewee.PostgresqlDatabase:
    from playhouse.db_url import connect

    return connect(url)


@pytest.fixture(scope="session")
def postgres_url():
    """One throw-away database for the whole run, dropped at the end."""
    required = os.environ.get("MAILBRIDGE_TEST_REQUIRE_POSTGRES") == "1"
    try:
        admin = _pg_connect(PG_ADMIN_URL)
        admin.connect()
    except Exception as exc:  # noqa: BLE001 - any failure means "no server here"
        message = f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    name = f"mailbridge_test_{secrets.token_hex(4)}"
    admin.execute_sql(f"CREATE DATABASE {name}")
    admin.close()
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    admin.connect()
    admin.execute_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mailbridge.db'}"
    url = request.getfixturevalue("postgres_url")
    db = _pg_connect(url)
    db.execute_sql("DROP SCHEMA public CASCADE")
    db.execute_sql("CREATE SCHEMA public")
    db.close()
    return url


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    return make_settings(tmp_path / "data", db_url)


@pytest.fixture
def runtime(settings):
    rt = build_runtime(settings, master_key=secrets.token_bytes(32))
    schema.upgrade(rt.db, system_clock())
    yield rt
    rt.db.close()


@pytest.fixture
def owner_portal(runtime):
    """(runtime with a ManualClock, portal app) where OWNER already has an account."""
    from tests.portal_helpers import OWNER, make_account, make_app, portal_runtime

    rt = portal_runtime(runtime)
    make_account(rt, OWNER)
    return rt, make_app(rt)


# --- the running service ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def keyring():
    """DKIM keys for the member's domain, served by an injected resolver."""
    from tests.dkim_helpers import DkimKeyring

    ring = DkimKeyring()
    ring.private_key = ring.add("clinic.example", "mb2024", bits=1024)
    return ring


@pytest.fixture
def sink():
    from tests.smtp_sink import SmtpSink

    with SmtpSink() as s:
        yield s


class RunningService:
    def __init__(self, service, runtime, sink, keyring):
        self.service, self.runtime, self.sink, self.keyring = service, runtime, sink, keyring

    @property
    def smtp_port(self) -> int:
        return self.runtime.settings.smtp.port

    def send(self, message, *, sign: bool = True, sender: str | None = None,
             rcpts=(SHARING,)) -> None:
        """Deliver like a member's provider would: DKIM-signed, CRLF, over SMTP."""
        import smtplib

        from tests.dkim_helpers import sign as dkim_sign
        from tests.helpers import wire

        raw = wire(message)
        if sign:
            raw = dkim_sign(raw, "clinic.example", "mb2024", self.keyring.private_key)
        envelope_from = sender if sender is not None else message["From"].addresses[0].addr_spec
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as smtp:
            smtp.sendmail(envelope_from, list(rcpts), raw)

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until the spool and the outbox have nothing left to do."""
        import time

        from mailbridge.store.models import InboundMessage, OutboundMessage

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = (InboundMessage.select().where(InboundMessage.state << ("queued",
                                                                           "processing")).count()
                    + OutboundMessage.select().where(OutboundMessage.state << ("queued",
                                                                               "sending")).count())
            if not busy:
                return
            time.sleep(0.05)
        raise TimeoutError("service did not finish its work in time")


def start_service(tmp_path, db_url, sink, keyring, **env):
    from mailbridge.service import Service

    values = {
        "MAILBRIDGE_SMTP_PORT": str(free_port()),
        "MAILBRIDGE_WEB_PORT": "0",
        "MAILBRIDGE_OUTBOUND_TRANSPORT": "smtp",
        "MAILBRIDGE_OUTBOUND_SMTP_PORT": str(sink.port),
        "MAILBRIDGE_OUTBOUND_RETRY_BASE_SECONDS": "0.2",
    }
    values.update(env)
    settings = make_settings(tmp_path / "data", db_url, **values)
    # The data directory's own key when `mailbridge init` made one (the CLI reads with it).
    key = (read_master_key(settings, env={}) if settings.master_key_path.exists()
           else secrets.token_bytes(32))
    rt = build_runtime(settings, master_key=key, dnsfunc=keyring.dnsfunc)
    schema.upgrade(rt.db, system_clock())
    svc = Service(rt)
    svc.start()
    return RunningService(svc, rt, sink, keyring)


@pytest.fixture
def service(tmp_path, db_url, sink, keyring):
    running = start_service(tmp_path, db_url, sink, keyring)
    yield running
    running.service.stop(timeout=10)


# --- a real browser --------------------------------------------------------------------------

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright. scripts/test sets MAILBRIDGE_TEST_REQUIRE_BROWSER
    after installing it, so there a missing browser fails instead of skipping."""
    import shutil

    required = os.environ.get("MAILBRIDGE_TEST_REQUIRE_BROWSER") == "1"
    executable = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if executable is None or sync_playwright is None:
        message = "Chromium or playwright is not installed"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def pytest_terminal_summary(terminalreporter):
    shots = sorted(ARTIFACTS.glob("*.png")) if ARTIFACTS.exists() else []
    if shots:
        terminalreporter.write_line(
            f"screenshots of what recipients see: {len(shots)} in {ARTIFACTS}")
