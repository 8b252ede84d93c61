"""The `mailbridge` command as an operator uses it: set-up, members, shares and the spool,
against a config file and an SQLite database in a temporary directory."""

from __future__ import annotations

import base64
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from mailbridge.cli import cli
from mailbridge.config import ConfigError, load_settings
from mailbridge.receive import spool
from mailbridge.runtime import build_runtime
from mailbridge.store.schema import LATEST
from tests.conftest import ROOT, start_service
from tests.helpers import MEMBER, MINIMAL_CONFIG, pdf_bytes, share_message


@pytest.fixture(autouse=True)
def no_env_overrides(monkeypatch):
    """The operator's own MAILBRIDGE_* variables must not change what these tests see."""
    for name in list(os.environ):
        if name.startswith("MAILBRIDGE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def cfg(tmp_path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL_CONFIG)
    return path


def mb(cfg: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner(env=env).invoke(cli, ["--config", str(cfg), *args])


def ok(cfg: Path, *args: str) -> str:
    result = mb(cfg, *args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def mb_process(*args: str) -> subprocess.CompletedProcess:
    """The installed entry point's behaviour: `main()` turns configuration errors into exit 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBRIDGE_")}
    return subprocess.run([sys.executable, "-m", "mailbridge", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def ready(cfg) -> Path:
    ok(cfg, "init")
    return cfg


# --- set-up --------------------------------------------------------------------------------


def test_init_creates_data_dir_private_key_and_schema(cfg, tmp_path):
    out = ok(cfg, "init")
    data = tmp_path / "data"
    key = data / "master.key"
    assert data.is_dir() and key.is_file()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(base64.b64decode(key.read_text().strip())) == 32
    assert "created master key" in out and "back it up" in out
    assert "1: initial tables" in out
    assert f"schema version {LATEST} (latest {LATEST})" in ok(cfg, "db", "version")
    # Private to the service's user from the start: the folder and every file in it.
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = [p for p in data.rglob("*") if p.is_file()]
    assert any(p.name == "mailbridge.db" for p in files)
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}


def test_init_makes_an_older_data_directory_private(cfg, tmp_path):
    data = tmp_path / "data"
    (data / "documents" / "ab").mkdir(parents=True)
    old = data / "documents" / "ab" / ("ab" + "0" * 30)
    old.write_bytes(b"sealed")
    for path, mode in ((data, 0o755), (data / "documents", 0o755), (old, 0o644)):
        path.chmod(mode)
    assert "folder(s) private to this user" in ok(cfg, "init")
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "documents").stat().st_mode) == 0o700


def test_second_init_keeps_the_key(ready, tmp_path):
    key = tmp_path / "data" / "master.key"
    before = key.read_bytes()
    out = ok(ready, "init")
    assert key.read_bytes() == before
    assert "already exists; kept" in out and "already current" in out


def test_db_upgrade_is_idempotent(cfg):
    ok(cfg, "init")
    assert "schema already current" in ok(cfg, "db", "upgrade")
    assert "schema already current" in ok(cfg, "db", "upgrade")
    assert f"schema version {LATEST} " in ok(cfg, "db", "version")


def test_db_upgrade_creates_the_schema_when_the_key_comes_from_the_environment(cfg):
    env = {"MAILBRIDGE_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
    assert "schema version 0" in mb(cfg, "db", "version", env=env).stdout
    assert "applied: 1: initial tables" in mb(cfg, "db", "upgrade", env=env).stdout
    assert f"schema version {LATEST} " in mb(cfg, "db", "version", env=env).stdout


def test_command_before_init_says_to_run_init(cfg):
    result = mb(cfg, "members", "list")
    assert isinstance(result.exception, ConfigError)
    assert "mailbridge init" in str(result.exception)


def test_uninitialised_database_names_the_setting_and_the_fix(cfg):
    # The key is there (from the environment), but nobody created the tables.
    env = {"MAILBRIDGE_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
    result = mb(cfg, "members", "list", env=env)
    assert isinstance(result.exception, ConfigError)
    message = str(result.exception)
    assert "[database] url" in message
    assert "mailbridge init" in message and "db upgrade" in message


def test_uninitialised_database_exits_2_from_the_command_line(cfg):
    proc = mb_process("--config", str(cfg), "members", "list")
    assert proc.returncode == 2
    assert "mailbridge: configuration error" in proc.stderr
    assert "mailbridge init" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_config_value_exits_2_naming_the_key(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL_CONFIG + '\n[smtp]\nport = "abc"\n')
    proc = mb_process("--config", str(path), "members", "list")
    assert proc.returncode == 2
    assert "[smtp] port" in proc.stderr and "'abc'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file_names_the_option(tmp_path):
    proc = mb_process("--config", str(tmp_path / "nowhere.toml"), "members", "list")
    assert proc.returncode == 2
    assert "--config" in proc.stderr and "nowhere.toml" in proc.stderr


def test_help_works_without_a_config_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBRIDGE_")}
    proc = subprocess.run([sys.executable, "-m", "mailbridge", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for command in ("init", "serve", "members", "shares", "spool", "db"):
        assert command in proc.stdout


# --- members -------------------------------------------------------------------------------


def test_added_member_is_listed(ready):
    out = ok(ready, "members", "add", "Jane.Doe@Clinic.example", "--name", "Jane Doe",
             "--clinic", "Riverside PT")
    assert "jane.doe@clinic.example" in out
    assert ok(ready, "members", "list").splitlines() == [
        "jane.doe@clinic.example\tJane Doe\tRiverside PT\tactive"]


def test_invalid_address_is_refused_naming_the_argument(ready):
    result = mb(ready, "members", "add", "not-an-address", "--name", "X")
    assert result.exit_code != 0
    assert "Invalid value for EMAIL" in result.stderr and "not-an-address" in result.stderr
    assert ok(ready, "members", "list") == ""


def test_adding_an_active_member_twice_fails_clearly(ready):
    ok(ready, "members", "add", MEMBER, "--name", "Jane Doe")
    result = mb(ready, "members", "add", MEMBER, "--name", "Jane Doe")
    assert result.exit_code != 0
    assert "already an active member" in result.stderr
    assert len(ok(ready, "members", "list").splitlines()) == 1


def test_disabled_member_is_listed_as_disabled_and_can_be_reactivated(ready):
    ok(ready, "members", "add", MEMBER, "--name", "Jane Doe", "--clinic", "Riverside PT")
    assert "disabled" in ok(ready, "members", "disable", MEMBER)
    assert ok(ready, "members", "list").rstrip("\n").endswith("\tdisabled")
    ok(ready, "members", "add", MEMBER, "--name", "Jane Doe", "--clinic", "Riverside PT")
    assert ok(ready, "members", "list").rstrip("\n").endswith("\tactive")


def test_disabling_a_stranger_fails_naming_the_argument(ready):
    result = mb(ready, "members", "disable", "nobody@clinic.example")
    assert result.exit_code != 0
    assert "Invalid value for EMAIL" in result.stderr and "not a member" in result.stderr


# --- shares --------------------------------------------------------------------------------


def test_shares_list_and_show_after_a_real_share(ready, tmp_path, sink, keyring):
    ok(ready, "members", "add", MEMBER, "--name", "Jane Doe", "--clinic", "Riverside PT")
    running = start_service(tmp_path, f"sqlite:///{tmp_path / 'data' / 'mailbridge.db'}",
                            sink, keyring)
    try:
        running.send(share_message(
            recipients=["dr.smith@ortho.example", "counsel@law.example"], subject="POC R.T.",
            attachments=[("plan.pdf", pdf_bytes(size=3000)), ("notes.pdf", None)]))
        sink.wait_for(3, timeout=15)
        running.drain()
    finally:
        running.service.stop(timeout=10)

    [line] = ok(ready, "shares", "list").splitlines()
    assert line.startswith("#1\t") and MEMBER in line
    assert "2 document(s)" in line and "2 recipient(s): pending" in line

    out = ok(ready, "shares", "show", "1")
    assert "by Jane Doe <jane.doe@clinic.example> (Riverside PT)" in out
    assert "title: POC R.T." in out
    documents = out.split("documents:\n")[1].split("recipients:\n")[0].splitlines()
    assert [d.split("\t")[0].strip() for d in documents] == ["plan.pdf", "notes.pdf"]
    recipients = out.split("recipients:\n")[1].splitlines()
    assert sorted(r.split("\t")[0].strip() for r in recipients) == [
        "counsel@law.example", "dr.smith@ortho.example"]
    assert all("link e-mail sent" in r for r in recipients)


def test_showing_an_unknown_share_fails_naming_the_argument(ready):
    result = mb(ready, "shares", "show", "999")
    assert result.exit_code != 0
    assert "Invalid value for ID" in result.stderr and "no share #999" in result.stderr


# --- spool ---------------------------------------------------------------------------------


def test_failed_message_is_listed_and_retry_queues_it_again(ready):
    runtime = build_runtime(load_settings(ready, env={}))
    try:
        row = spool.enqueue(runtime, b"Subject: x\r\n\r\nbody\r\n", channel="smtp",
                            envelope_from=MEMBER, envelope_to=["share@portal.example"])
        spool.park_failed(runtime, row, "unexpected error (RuntimeError)",
                          "Traceback (most recent call last):\nRuntimeError: simulated bug")
    finally:
        runtime.db.close()

    [line] = ok(ready, "spool", "list").splitlines()
    assert line.startswith(f"#{row.id}\t")
    assert "\tfailed\t" in line and line.endswith("unexpected error (RuntimeError)")
    shown = ok(ready, "spool", "show", str(row.id))
    assert "state: failed (error)" in shown and "RuntimeError: simulated bug" in shown
    assert ok(ready, "spool", "list", "--state", "queued") == ""

    assert "queued again" in ok(ready, "spool", "retry", str(row.id))
    [line] = ok(ready, "spool", "list", "--state", "queued").splitlines()
    assert line.startswith(f"#{row.id}\t") and "attempts 0" in line
    assert ok(ready, "spool", "list", "--state", "failed") == ""


def test_retry_all_failed_queues_every_failed_message_but_the_unreadable(ready):
    runtime = build_runtime(load_settings(ready, env={}))
    try:
        rows = [spool.enqueue(runtime, b"Subject: x\r\n\r\nbody\r\n", channel="smtp",
                              envelope_from=MEMBER, envelope_to=["share@portal.example"])
                for _ in range(3)]
        for row in rows[:2]:
            spool.park_failed(runtime, row, "gave up")
        unreadable = spool.enqueue(runtime, b"", channel="imap", envelope_from="",
                                   envelope_to=[], unreadable="no header")
    finally:
        runtime.db.close()
    assert ok(ready, "spool", "retry", "--all-failed").startswith("2 failed inbound message(s)")
    queued = ok(ready, "spool", "list", "--state", "queued")
    assert {line.split("\t")[0] for line in queued.splitlines()} == {f"#{r.id}" for r in rows}
    [failed] = ok(ready, "spool", "list", "--state", "failed").splitlines()
    assert failed.startswith(f"#{unreadable.id}\t")
    result = mb(ready, "spool", "retry")
    assert result.exit_code != 0 and "either a message ID or --all-failed" in result.stderr


def test_a_message_waiting_for_the_service_says_so_and_when(ready):
    runtime = build_runtime(load_settings(ready, env={}))
    try:
        spool.enqueue(runtime, b"Subject: x\r\n\r\nbody\r\n", channel="smtp",
                      envelope_from=MEMBER, envelope_to=["share@portal.example"])
        row = spool.claim_next(runtime, "node-a")
        assert spool.wait_for_service(runtime, row, "storage full", 30) == "waiting"
    finally:
        runtime.db.close()
    [line] = ok(ready, "spool", "list").splitlines()
    assert "\tqueued\t" in line and "attempts 0" in line  # the wait is not counted
    assert "waiting: storage full (next try " in line


def test_retrying_an_unknown_message_fails_naming_the_argument(ready):
    result = mb(ready, "spool", "retry", "999")
    assert result.exit_code != 0
    assert "Invalid value for ID" in result.stderr and "no failed message #999" in result.stderr
