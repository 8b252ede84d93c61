"""`mailbridge imap check`, `imap poll` and `serve` with IMAP, as an operator runs them against
a real Dovecot: plain-language mistakes naming the key, TLS with a private CA, a poller killed
mid-backlog, unreadable mail in the failed folder, and a clean stop."""

from __future__ import annotations

import mailbox
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from mailbridge.cli import cli
from mailbridge.config import load_settings
from mailbridge.runtime import build_runtime
from mailbridge.store.models import InboundMessage
from tests import dovecot
from tests.conftest import ROOT, free_port
from tests.dovecot import PASSWORD, Dovecot
from tests.helpers import MEMBER, share_message, wire

pytestmark = pytest.mark.slow

PROCESSED = "mailbridge.processed"
FAILED = "mailbridge.failed"

CONFIG = """\
[service]
base_url = "http://portal.example"
data_dir = "data"

[smtp]
port = {smtp_port}

[web]
port = {web_port}

[metrics]
port = 0

[addresses]
sharing = "share@portal.example"
reply_domain = "reply.portal.example"

[outbound]
transport = "maildir"
from = "mailbridge@portal.example"

[senders]
require_authentication = false

[worker]
poll_seconds = 0.5

[imap]
enabled = true
host = "127.0.0.1"
port = {imap_port}
security = "none"
username = "{user}"
password_file = "imap-password"
"""


@dataclass(frozen=True)
class Setup:
    config: Path
    user: str

    @property
    def outbox(self) -> Path:
        return self.config.parent / "data" / "outbox"


@pytest.fixture(scope="module")
def server():
    dovecot.require()
    with Dovecot(spare=12) as running:
        yield running


@pytest.fixture(autouse=True)
def no_env_overrides(monkeypatch):
    """The operator's own MAILBRIDGE_* variables must not change what these tests see."""
    for name in list(os.environ):
        if name.startswith("MAILBRIDGE_") and not name.startswith("MAILBRIDGE_TEST_"):
            monkeypatch.delenv(name)


def make_setup(directory: Path, server: Dovecot, user: str) -> Setup:
    config = directory / "config.toml"
    config.write_text(CONFIG.format(smtp_port=free_port(), web_port=free_port(),
                                    imap_port=server.port, user=user))
    (directory / "imap-password").write_text(PASSWORD + "\n")
    setup = Setup(config, user)
    ok(setup, "init")
    ok(setup, "members", "add", MEMBER, "--name", "Jane Doe")
    return setup


@pytest.fixture
def setup(tmp_path, server) -> Setup:
    return make_setup(tmp_path, server, server.fresh_user())


def mb(setup: Setup, *args: str, **env: str) -> Result:
    return CliRunner(env=env).invoke(cli, ["--config", str(setup.config), *args])


def ok(setup: Setup, *args: str, **env: str) -> str:
    result = mb(setup, *args, **env)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBRIDGE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spool_rows(setup: Setup) -> list[InboundMessage]:
    runtime = build_runtime(load_settings(setup.config, env={}))
    try:
        return list(InboundMessage.select().order_by(InboundMessage.id))
    finally:
        runtime.db.close()


def wait_until(condition, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


# --- imap check ------------------------------------------------------------------------------


def test_check_lists_capabilities_counts_waiting_mail_and_creates_the_folders(setup, server):
    server.append(wire(share_message()), wire(share_message()), user=setup.user)
    out = ok(setup, "imap", "check")
    assert f"connected to 127.0.0.1:{server.port} (none) as {setup.user}" in out
    assert "IDLE" in out.split("capabilities:")[1].splitlines()[0]
    assert "INBOX: 2 message(s) waiting" in out
    assert f"created folder {PROCESSED}" in out and f"created folder {FAILED}" in out
    assert server.count(PROCESSED, setup.user) == 0  # created, and nothing touched
    assert server.count("INBOX", setup.user) == 2
    assert "created folder" not in ok(setup, "imap", "check")  # the second time: all there


# --- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server():
    dovecot.require()
    with Dovecot(tls=True, spare=4) as running:
        yield running


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_self_signed_server_is_trusted_through_ca_file_and_refused_without(security, tmp_path,
                                                                           tls_server):
    setup = make_setup(tmp_path, tls_server, tls_server.fresh_user())
    port = tls_server.imaps_port if security == "tls" else tls_server.port
    env = {"MAILBRIDGE_IMAP_SECURITY": security, "MAILBRIDGE_IMAP_PORT": str(port)}

    refused = mb(setup, "imap", "check", **env)
    assert refused.exit_code == 1
    assert "[imap] ca_file" in refused.output and "not trusted" in refused.output

    trusted = {**env, "MAILBRIDGE_IMAP_CA_FILE": str(tls_server.ca_file)}
    assert f"({security})" in ok(setup, "imap", "check", **trusted)
    tls_server.append(wire(share_message()), user=setup.user)
    assert "1 new message(s) spooled" in ok(setup, "imap", "poll", "--once", **trusted)


# --- imap poll -------------------------------------------------------------------------------


def test_unreadable_message_goes_to_the_failed_folder_and_spool_list(setup, server):
    server.append(b"this is not an e-mail message at all\r\n", user=setup.user)
    out = ok(setup, "imap", "poll", "--once")
    assert "0 new message(s) spooled, 1 moved to the failed folder (1 unreadable)" in out
    assert server.count(FAILED, setup.user) == 1 and server.count("INBOX", setup.user) == 0
    [line] = ok(setup, "spool", "list").splitlines()
    assert "\timap\tfailed\tunreadable\t" in line and "no header fields" in line


def test_sigkill_mid_backlog_loses_and_doubles_nothing(setup, server):
    total = 400
    server.append(*[wire(share_message(note=f"message {n}")) for n in range(total)],
                  user=setup.user)
    env = {**subprocess_env(), "MAILBRIDGE_IMAP_BATCH_SIZE": "100"}
    poller = subprocess.Popen([sys.executable, "-m", "mailbridge", "--config",
                               str(setup.config), "imap", "poll"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Mid-batch: these rows are committed, but their batch has not been moved yet.
        wait_until(lambda: 20 <= len(spool_rows(setup)) % 100 <= 80, "the first rows")
    finally:
        poller.kill()
        poller.wait(10)
    assert poller.returncode == -signal.SIGKILL
    assert len(spool_rows(setup)) < total

    out = ok(setup, "imap", "poll", "--once")  # the restarted poller
    assert "already spooled" in out  # it did meet messages spooled but never moved
    rows = spool_rows(setup)
    assert len(rows) == total
    assert len({r.raw_sha256 for r in rows}) == total == len({r.source_key for r in rows})
    assert server.count("INBOX", setup.user) == 0
    assert server.count(PROCESSED, setup.user) == total


# --- serve -----------------------------------------------------------------------------------


def test_serve_runs_the_poller_and_stops_cleanly_on_sigterm(setup, server):
    out_path = setup.config.parent / "serve.out"
    err_path = setup.config.parent / "serve.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "mailbridge", "--config",
                                    str(setup.config), "serve"], cwd=ROOT,
                                   env=subprocess_env(), stdout=out, stderr=err)
    try:
        wait_until(lambda: "running" in out_path.read_text(), "serve to start")
        assert "IMAP intake from the folder INBOX" in out_path.read_text()
        server.append(wire(share_message()), user=setup.user)
        wait_until(lambda: (setup.outbox / "new").is_dir()
                   and len(mailbox.Maildir(setup.outbox, create=False)) == 2,
                   "the link e-mail and the receipt")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert time.monotonic() - started < 5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert out_path.read_text().rstrip().endswith("mailbridge: stopped")
    assert "Traceback" not in err_path.read_text()
    assert server.count(PROCESSED, setup.user) == 1


# --- mistakes (last: Dovecot slows logins from an address after a failed one) ---------------------


def _wrong_password(setup: Setup, server: Dovecot) -> dict[str, str]:
    path = setup.config.parent / "wrong-password"
    path.write_text("not-the-password")
    return {"MAILBRIDGE_IMAP_PASSWORD_FILE": str(path)}


MISTAKES = {
    "no-password": (lambda setup, server: {"MAILBRIDGE_IMAP_PASSWORD_FILE": "",
                                           "MAILBRIDGE_IMAP_PASSWORD": ""},
                    ["[imap] password_env / password_file", "MAILBRIDGE_IMAP_PASSWORD"]),
    "unreachable": (lambda setup, server: {"MAILBRIDGE_IMAP_PORT": str(free_port())},
                    ["[imap] host / port", "refused the connection"]),
    "missing-folder": (lambda setup, server: {"MAILBRIDGE_IMAP_FOLDER": "Shared/Intake"},
                       ["[imap] folder", "no folder 'Shared.Intake'", "INBOX"]),
    "tls-to-plain-port": (lambda setup, server: {"MAILBRIDGE_IMAP_SECURITY": "tls"},
                          ["[imap] security", "TLS with"]),
    "bad-credentials": (_wrong_password,
                        ["[imap] username / password_env", "refused the login"]),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_check_explains_each_mistake_naming_the_key(mistake, setup, server):
    make_env, expected = MISTAKES[mistake]
    result = mb(setup, "imap", "check", **make_env(setup, server))
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output
    assert PASSWORD not in result.output and "not-the-password" not in result.output
