"""The real `mailbridge serve` process: mail in over SMTP, link e-mails out to the Maildir,
clean stops on SIGTERM/SIGINT, and no lost or doubled share after a crash."""

from __future__ import annotations

import mailbox
import os
import re
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

from mailbridge.config import load_settings
from mailbridge.outbound import outbox as outbox_queue
from mailbridge.receive import spool, worker
from mailbridge.runtime import build_runtime
from mailbridge.store.models import InboundMessage, OutboundMessage, Share
from tests.conftest import ROOT, SHARING, free_port
from tests.helpers import MEMBER, pdf_bytes, share_message, wire
from tests.tls_helpers import Certificate, make_certificate, served_fingerprint

pytestmark = pytest.mark.slow

LINK = re.compile(r"http://portal\.example/s/[A-Za-z0-9_-]{43}")
TIMEOUT = 20.0


@dataclass(frozen=True)
class Setup:
    config: Path
    data_dir: Path
    smtp_port: int

    @property
    def outbox(self) -> Path:
        return self.data_dir / "outbox"


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBRIDGE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def mailbridge(setup: Setup, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "mailbridge", "--config", str(setup.config),
                           *args], cwd=ROOT, env=environment(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def wait_until(condition: Callable[[], object], what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


class ServeProcess:
    """`mailbridge serve` with its output in files (nothing to drain, readable any time)."""

    def __init__(self, setup: Setup, name: str,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.setup = setup
        self.out_path = setup.config.parent / f"{name}.out"
        self.err_path = setup.config.parent / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailbridge", "--config", str(setup.config), "serve"],
                cwd=ROOT, env=environment(), stdout=out, stderr=err,
                preexec_fn=preexec_fn)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_ready(self) -> None:
        """Until the SMTP port answers; intake is started last, so everything else runs."""

        def accepting() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.stderr}")
            try:
                socket.create_connection(("127.0.0.1", self.setup.smtp_port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_until(accepting, "the SMTP port to accept connections")
        # The start-up lines are printed just after intake starts listening.
        wait_until(lambda: "mailbridge: running" in self.stdout, "the start-up lines")

    def signal(self, signum: int, timeout: float = 10.0) -> int:
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # What it is stuck on, for whoever reads the failure (SIGUSR1: every stack).
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
            raise AssertionError(f"serve still running {timeout:g} s after signal {signum}; "
                                 f"its stacks:\n{self.stderr[-20000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def setup(tmp_path) -> Setup:
    config = tmp_path / "config.toml"
    smtp_port = free_port()
    config.write_text(f"""\
[service]
base_url = "http://portal.example"
data_dir = "data"

[smtp]
port = {smtp_port}

[web]
port = {free_port()}

[metrics]
port = 0

[addresses]
sharing = "{SHARING}"
reply_domain = "reply.portal.example"

[outbound]
transport = "maildir"
from = "mailbridge@portal.example"

[senders]
require_authentication = false

[worker]
poll_seconds = 0.5
""")
    result = Setup(config, tmp_path / "data", smtp_port)
    mailbridge(result, "init")
    mailbridge(result, "members", "add", MEMBER, "--name", "Jane Doe", "--clinic",
               "Riverside PT")
    return result


@pytest.fixture
def serve(setup):
    """Starts `serve` (as often as a test needs); every process is killed at teardown."""
    started: list[ServeProcess] = []

    def start() -> ServeProcess:
        process = ServeProcess(setup, f"serve{len(started)}")
        started.append(process)
        process.wait_ready()
        return process

    yield start
    for process in started:
        process.kill()


def send(setup: Setup, message: EmailMessage) -> None:
    with smtplib.SMTP("127.0.0.1", setup.smtp_port, timeout=10) as smtp:
        refused = smtp.sendmail(MEMBER, [SHARING], wire(message))
    assert refused == {}


def outbox(setup: Setup) -> list[EmailMessage]:
    if not (setup.outbox / "new").is_dir():
        return []
    parser = BytesParser(policy=policy.default)
    return [parser.parsebytes(bytes(m)) for m in mailbox.Maildir(setup.outbox, create=False)]


def text_of(message: EmailMessage) -> str:
    return "\n".join(p.get_content() for p in message.walk()
                     if p.get_content_type() == "text/plain")


@dataclass(frozen=True)
class State:
    shares: int
    inbound: list[str]
    outbound: list[str]

    @property
    def settled(self) -> bool:
        return (bool(self.inbound) and all(s not in ("queued", "processing") for s in self.inbound)
                and all(s not in ("queued", "sending") for s in self.outbound))


def database_state(setup: Setup) -> State:
    runtime = build_runtime(load_settings(setup.config, env={}))
    try:
        return State(Share.select().count(),
                     [r.state for r in InboundMessage.select().order_by(InboundMessage.id)],
                     [r.state for r in OutboundMessage.select().order_by(OutboundMessage.id)])
    finally:
        runtime.db.close()


def wait_settled(setup: Setup, mails: int, timeout: float = TIMEOUT) -> State:
    """Until the spool and outbox are finished and the Maildir holds `mails` messages; then a
    little longer, so anything sent twice would show up."""
    wait_until(lambda: database_state(setup).settled and len(outbox(setup)) >= mails,
               f"{mails} e-mails in the Maildir", timeout)
    time.sleep(1.0)  # two worker polls
    return database_state(setup)


def split_outbox(setup: Setup) -> tuple[dict[str, list[EmailMessage]], list[EmailMessage]]:
    """Link e-mails by recipient, and receipts to the member."""
    links: dict[str, list[EmailMessage]] = {}
    receipts = []
    for message in outbox(setup):
        to = message["Delivered-To"]
        if to == MEMBER:
            receipts.append(message)
        else:
            links.setdefault(to, []).append(message)
    return links, receipts


# --- a message through the running process -------------------------------------------------


def test_member_message_becomes_link_emails_and_a_receipt(setup, serve):
    process = serve()
    recipients = ["dr.smith@ortho.example", "counsel@law.example"]
    send(setup, share_message(recipients=recipients, subject="POC R.T.",
                              attachments=[("plan.pdf", pdf_bytes(size=4000))]))
    state = wait_settled(setup, 3)
    assert state.shares == 1 and state.inbound == ["done"]

    links, receipts = split_outbox(setup)
    assert sorted(links) == sorted(recipients)
    assert all(len(m) == 1 for m in links.values()) and len(receipts) == 1
    tokens = {LINK.search(text_of(m)).group(0) for [m] in links.values()}
    assert len(tokens) == 2
    # The operator of a Maildir set-up sees each link on the console.
    printed = set(LINK.findall(process.stdout))
    assert printed == tokens
    assert "plan.pdf" in text_of(receipts[0])
    # Everything the running service wrote is its user's alone (umask 077).
    written = [p for p in setup.data_dir.rglob("*") if p.is_file()]
    assert any(p.name == "mailbridge.db-wal" for p in written)
    assert any("documents" in p.parts for p in written) and any("spool" in p.parts
                                                                  for p in written)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {oct(0o600)}


def test_startup_names_smtp_and_maildir_and_warns_that_authentication_is_off(setup, serve):
    process = serve()
    out = process.stdout
    assert f"SMTP intake on 127.0.0.1:{setup.smtp_port} for {SHARING}" in out
    assert f"Maildir {setup.outbox}" in out
    assert "require_authentication = false" in process.stderr
    assert "!" * 40 in process.stderr


# --- stopping --------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_service_cleanly(setup, serve, signum):
    process = serve()
    started = time.monotonic()
    assert process.signal(signum) == 0
    assert time.monotonic() - started < 5
    assert "mailbridge: stopping" in process.stdout
    assert process.stdout.rstrip().endswith("mailbridge: stopped")
    assert "Traceback" not in process.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", setup.smtp_port), timeout=1).close()


def test_usr1_prints_every_stack_and_changes_nothing(setup, serve):
    """What an operator does when a stop hangs (`systemctl kill -s USR1`): the stacks of every
    thread of `serve` and of each worker process, in the log, and the service goes on."""
    process = serve()
    workers = [int(pid) for pid in
               re.search(r"worker process\(es\) \(pids ([\d ]+)\)", process.stdout)[1].split()]
    assert workers
    for pid in [process.proc.pid, *workers]:
        os.kill(pid, signal.SIGUSR1)
    main = r"line \d+ in run_until_stopped\n"
    worker_main = r'receive/processes\.py", line \d+ in run\n'
    wait_until(lambda: (re.search(main, process.stderr)
                        and len(re.findall(worker_main, process.stderr)) == len(workers)),
               "the stacks of serve and of its worker processes")
    send(setup, share_message())
    assert wait_settled(setup, 2).shares == 1  # still taking and processing mail
    assert process.signal(signal.SIGTERM) == 0


# --- crash recovery --------------------------------------------------------------------------


def test_message_left_processing_by_a_crash_is_finished_once_at_start(setup, serve):
    # What a worker killed mid-message leaves behind: a row claimed by this node.
    runtime = build_runtime(load_settings(setup.config, env={}))
    try:
        spool.enqueue(runtime, wire(share_message()), channel="smtp", envelope_from=MEMBER,
                      envelope_to=[SHARING])
        claimed = spool.claim_next(runtime, worker.node_name(runtime))
        assert claimed is not None and claimed.state == "processing"
    finally:
        runtime.db.close()

    process = serve()
    state = wait_settled(setup, 2)
    assert state.shares == 1 and state.inbound == ["done"]
    links, receipts = split_outbox(setup)
    assert {to: len(m) for to, m in links.items()} == {"dr.smith@ortho.example": 1}
    assert len(receipts) == 1
    assert len(LINK.findall(process.stdout)) == 1
    assert "interrupted by the last stop are queued again" in process.stderr


def test_sigkill_right_after_acceptance_loses_nothing_and_doubles_nothing(setup, serve):
    process = serve()
    send(setup, share_message())
    process.proc.kill()  # whatever the service was doing at that moment
    assert process.proc.wait(10) == -signal.SIGKILL

    serve()
    state = wait_settled(setup, 2)
    assert state.shares == 1 and state.inbound == ["done"]
    assert all(s == "sent" for s in state.outbound)
    links, receipts = split_outbox(setup)
    assert {to: len(m) for to, m in links.items()} == {"dr.smith@ortho.example": 1}
    assert len(receipts) == 1


def test_link_emails_left_sending_by_a_crash_go_out_soon_after_start(setup, serve):
    # A share made, its e-mails claimed by a dispatcher that was killed before sending them.
    runtime = build_runtime(load_settings(setup.config, env={}))
    try:
        spool.enqueue(runtime, wire(share_message()), channel="smtp", envelope_from=MEMBER,
                      envelope_to=[SHARING])
        assert worker.run_once(runtime, worker.node_name(runtime))
        assert len(outbox_queue.claim_due(runtime, node=worker.node_name(runtime))) == 2
    finally:
        runtime.db.close()

    serve()
    state = wait_settled(setup, 2, timeout=8)
    assert state.shares == 1 and len(outbox(setup)) == 2


# --- TLS -------------------------------------------------------------------------------------


def configure(setup: Setup, section: str, lines: str) -> None:
    """Add `lines` to a [section] of the config (after its header, or as a new table)."""
    text = setup.config.read_text()
    header = f"[{section}]\n"
    text = (text.replace(header, header + lines, 1) if header in text
            else text + f"\n{header}{lines}")
    setup.config.write_text(text)


def install(cert: Certificate, live: Path) -> None:
    """What a certificate renewal does: new files in place of the old ones."""
    live.mkdir(exist_ok=True)
    shutil.copy(cert.cert, live / "cert.pem")
    shutil.copy(cert.key, live / "key.pem")


def test_sighup_reloads_the_smtp_certificate_and_keeps_it_when_the_renewal_is_bad(setup, serve):
    first = make_certificate(setup.config.parent / "tls", "first")
    second = make_certificate(setup.config.parent / "tls", "second")
    live = setup.config.parent / "live"
    install(first, live)
    configure(setup, "smtp", 'tls_cert_file = "live/cert.pem"\ntls_key_file = "live/key.pem"\n'
                             "require_tls = true\n")
    process = serve()
    assert "(STARTTLS required)" in process.stdout
    assert served_fingerprint("127.0.0.1", setup.smtp_port) == first.fingerprint

    install(second, live)
    process.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: served_fingerprint("127.0.0.1", setup.smtp_port) == second.fingerprint,
               "the renewed certificate to be served")

    (live / "key.pem").write_text("half-written\n")
    process.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "[smtp] tls_key_file" in process.stderr, "the reload error")
    assert served_fingerprint("127.0.0.1", setup.smtp_port) == second.fingerprint
    with smtplib.SMTP("127.0.0.1", setup.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=second.client_context())
        assert smtp.sendmail(MEMBER, [SHARING], wire(share_message())) == {}
    state = wait_settled(setup, 2)
    assert state.shares == 1
    assert process.signal(signal.SIGTERM) == 0
    assert "Traceback" not in process.stderr


def test_bad_certificate_stops_the_start_naming_the_key(setup):
    configure(setup, "smtp", 'tls_cert_file = "missing.pem"\ntls_key_file = "missing.key"\n')
    proc = subprocess.run([sys.executable, "-m", "mailbridge", "--config", str(setup.config),
                           "serve"], cwd=ROOT, env=environment(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "configuration error: [smtp] tls_cert_file: cannot read" in proc.stderr


def test_startup_warns_when_phi_would_go_in_clear_to_a_relay_elsewhere(setup, serve):
    setup.config.write_text(setup.config.read_text().replace('transport = "maildir"',
                                                             'transport = "smtp"'))
    configure(setup, "outbound.smtp", f'host = "relay.example"\nport = {free_port()}\n'
                                      'tls = "none"\n')
    process = serve()
    assert "outbound mail goes to the relay relay.example" in process.stdout
    assert "(tls = none)" in process.stdout
    assert 'tls = "none" and the relay relay.example is not on this machine' in process.stderr


# --- the portal's connections ----------------------------------------------------------------


def open_files_limit(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if x.startswith("Max open files"))
    return int(line.split()[3])


@pytest.mark.parametrize("soft, hard", [(512, None), (700, 700)])
def test_open_file_limit_is_raised_for_the_connection_limit_or_warned_about(setup, soft, hard):
    import resource

    def limit() -> None:
        current_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard or current_hard))

    if hard is None and resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1256:
        pytest.skip("the hard limit here is below what the default connection_limit needs")
    process = ServeProcess(setup, "limited", preexec_fn=limit)
    try:
        process.wait_ready()
        if hard is None:
            assert open_files_limit(process.proc.pid) == 1000 + 256
            assert "connection_limit" not in process.stderr
        else:
            assert open_files_limit(process.proc.pid) == 700
            assert ("[web] connection_limit = 1000 needs about 1256 open files, but this "
                    "process may open only 700") in process.stderr
    finally:
        process.kill()


@pytest.mark.parametrize("section", ["smtp", "web", "metrics"])
def test_a_port_in_use_is_one_line_naming_the_key_and_nothing_starts(setup, section):
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    text = setup.config.read_text()
    setup.config.write_text(re.sub(rf"(\[{section}\]\nport = )\d+", rf"\g<1>{port}", text))
    try:
        proc = subprocess.run([sys.executable, "-m", "mailbridge", "--config",
                               str(setup.config), "serve"], cwd=ROOT, env=environment(),
                              capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.strip().splitlines() if " WARNING " not in line]
    assert errors == [
        f"mailbridge: configuration error: [{section}] port: 127.0.0.1:{port} is already in use"]
    assert "running" not in proc.stdout
