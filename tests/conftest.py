"""Shared fixtures: settings in a temporary directory, a database per test (SQLite and
PostgreSQL), a runtime, a real SMTP sink as the relay, and the running service."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import peewee
import pytest

from mailbridge import schema
from mailbridge.clock import system_clock
from mailbridge.config import Settings, load_settings
from mailbridge.runtime import build_runtime

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
MAIL = ROOT / "tests" / "fixtures" / "mail"

SHARING = "share@portal.example"
REPLY_DOMAIN = "reply.portal.example"
OUTBOUND_FROM = "mailbridge@portal.example"

PG_ADMIN_URL = os.environ.get("MAILBRIDGE_TEST_POSTGRES",
                              "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
