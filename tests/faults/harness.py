"""What the fault tests share: a `mailbridge serve` process on its own PostgreSQL database with
a real SMTP sink as its relay, a sender that behaves like an MTA (retries what was not
acknowledged), the faults themselves (PostgreSQL connections cut or refused, SIGKILL) and the
tally a run is judged by: acknowledged, lost, duplicated shares, duplicate sends."""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from playhouse.db_url import connect

from mailbridge.config import load_settings
from mailbridge.runtime import build_runtime
from mailbridge.store.models import Grant, InboundMessage, OutboundMessage
from tests.conftest import PG_ADMIN_URL, ROOT, SHARING, free_port
from tests.helpers import MEMBER, pdf_bytes, share_message, wire
from tests.smtp_sink import SmtpSink

# The runs used 1,000 messages per scenario; the suite uses fewer to stay quick.
# `scripts/faults.py` sets this to run the larger figures.
MESSAGES = int(os.environ.get("MAILBRIDGE_FAULT_MESSAGES", "100"))
REPORT = os.environ.get("MAILBRIDGE_FAULT_REPORT", "")


def recipient(i: int) -> str:
    return f"p{i}@ortho.example"


@functools.cache
def fault_message(i: int) -> bytes:
    """Message number `i` as sent, the same bytes every time (MIME boundaries included): a
    sender's MTA retries the very message it queued."""
    return wire(share_message(
        recipients=[recipient(i)], subject=f"Plan of care {i}",
        attachments=[(f"plan-{i}.pdf", pdf_bytes(f"patient {i}", size=3000))],
        message_id=f"<fault-{i}@clinic.example>"))


def wait_until(condition: Callable[[], object], what: str, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


# --- PostgreSQL --------------------------------------------------------------------------


class Postgres:
    """A throw-away database and the administrator's hands on it."""

    def __init__(self) -> None:
        self.name = f"mb_faults_{secrets.token_hex(4)}"
        self.admin = connect(PG_ADMIN_URL)
        self.admin.execute_sql(f"CREATE DATABASE {self.name}")
        self.url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{self.name}"

    def terminate(self) -> int:
        """Cut every connection to the database (what a failover or restart does)."""
        cursor = self.admin.execute_sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()", (self.name,))
        return cursor.fetchone()[0]

    def allow_connections(self, allowed: bool) -> None:
        self.admin.execute_sql(f"ALTER DATABASE {self.name} ALLOW_CONNECTIONS "
                               f"{'true' if allowed else 'false'}")
        if not allowed:
            self.terminate()

    def drop(self) -> None:
        self.allow_connections(True)
        self.admin.execute_sql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        self.admin.close()


def postgres_or_skip() -> Postgres:
    """A throwaway database, or the test is skipped (failed where PostgreSQL is required)."""
    import pytest

    try:
        return Postgres()
    except Exception as exc:  # noqa: BLE001 - any failure means "no server here"
        if os.environ.get("MAILBRIDGE_TEST_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL not reachable: {exc}")
        pytest.skip(f"PostgreSQL not reachable: {exc}")


# --- the service -------------------------------------------------------------------------


def _toml(value: object) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower() \
        if isinstance(value, bool) else str(value)


@dataclass
class Site:
    root: Path
    db: Postgres
    sink: SmtpSink
    smtp_port: int = field(default_factory=free_port)
    processes: list[ServeProcess] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def write_config(self, **sections: dict[str, object]) -> None:
        config: dict[str, dict[str, object]] = {
            "service": {"base_url": "http://portal.example", "data_dir": "data"},
            "database": {"url": self.db.url},
            "smtp": {"port": self.smtp_port},
            "web": {"port": free_port()},
            "metrics": {"port": 0},  # nodes side by side: each its own port
            "addresses": {"sharing": SHARING, "reply_domain": "reply.portal.example"},
            "outbound": {"transport": "smtp", "from": "mailbridge@portal.example",
                         "retry_base_seconds": 1, "retry_max_seconds": 5},
            "outbound.smtp": {"port": self.sink.port, "timeout_seconds": 10, "tls": "none"},
            "senders": {"require_authentication": False},
            "shares": {"remind_before_hours": 0},
            "worker": {"poll_seconds": 0.5, "retry_base_seconds": 1, "retry_max_seconds": 5},
        }
        for name, values in sections.items():
            config.setdefault(name.replace("__", "."), {}).update(values)
        self.config.write_text("".join(
            f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items()) + "\n"
            for name, values in config.items()))

    def cli(self, *args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "mailbridge", "--config", str(self.config),
                               *args], cwd=ROOT, env=environment(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def init(self) -> None:
        self.cli("init")
        self.cli("members", "add", MEMBER, "--name", "Jane Doe", "--clinic", "Riverside PT")

    def serve(self, *, prefix: Sequence[str] = (),
              command: Sequence[str] = ("serve",)) -> ServeProcess:
        """`command` (e.g. `serve --no-worker`, `worker`) started, once it says it runs."""
        process = ServeProcess(self, f"serve{len(self.processes)}", prefix, command)
        self.processes.append(process)
        process.wait_ready()
        return process

    def kill_all(self) -> None:
        for process in self.processes:
            process.kill()

    def runtime(self):
        return build_runtime(load_settings(self.config, env={}))


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBRIDGE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServeProcess:
    """`mailbridge serve` with its output in files (readable at any time)."""

    def __init__(self, site: Site, name: str, prefix: Sequence[str] = (),
                 command: Sequence[str] = ("serve",)) -> None:
        self.site = site
        self.out_path = site.root / f"{name}.out"
        self.err_path = site.root / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "mailbridge", "--config", str(site.config),
                 *command], cwd=ROOT, env=environment(), stdout=out, stderr=err)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def log(self) -> str:
        return self.err_path.read_text()

    def wait_ready(self) -> None:
        def running() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log}")
            return "mailbridge: running" in self.stdout

        wait_until(running, "serve to start", 30)

    def kill(self) -> None:
        """SIGKILL to this process alone; returns once its worker processes have ended too
        (they die with their parent), so nothing of it still runs when a test goes on."""
        if self.proc.poll() is None:
            children = self.family()[1:]
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            wait_until(lambda: not [pid for pid in children if alive(pid)],
                       "the worker processes to end with their parent", 10)

    def family(self) -> list[int]:
        """This process and every process it started (worker processes), as now."""
        return descendants(self.proc.pid)

    def kill_node(self) -> None:
        """SIGKILL to this process and all its worker processes at once: the machine going
        down, not a graceful stop."""
        for pid in self.family():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> tuple[int, float]:
        """SIGTERM; (exit status, seconds to exit)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout)
        return status, time.monotonic() - started


# --- the sender (an MTA: what was not acknowledged is tried again) ------------------------


class Sender:
    """Sends numbered share requests over a few connections; `acknowledged` holds the numbers
    that got 250. Until `give_up_at`, a message not acknowledged (451, connection refused
    or cut) is tried again, as the sending MTA would."""

    def __init__(self, site: Site, *, connections: int = 4) -> None:
        self.site = site
        self.connections = connections
        self.acknowledged: set[int] = set()
        self.refusals = 0
        self._lock = threading.Lock()

    def send(self, numbers: Sequence[int], *, retry_for: float = 60.0) -> None:
        give_up_at = time.monotonic() + retry_for
        slices = [list(numbers[k::self.connections]) for k in range(self.connections)]
        with ThreadPoolExecutor(self.connections) as pool:
            list(pool.map(lambda part: self._send_part(part, give_up_at), slices))

    def send_in_background(self, numbers: Sequence[int], *,
                           retry_for: float = 60.0) -> threading.Thread:
        thread = threading.Thread(target=self.send, args=(numbers,),
                                  kwargs={"retry_for": retry_for}, daemon=True)
        thread.start()
        return thread

    def _send_part(self, numbers: list[int], give_up_at: float) -> None:
        pending = list(numbers)
        smtp: smtplib.SMTP | None = None
        while pending and time.monotonic() < give_up_at:
            i = pending[0]
            try:
                if smtp is None:
                    smtp = smtplib.SMTP("127.0.0.1", self.site.smtp_port, timeout=30)
                smtp.sendmail(MEMBER, [SHARING], fault_message(i))
            except (smtplib.SMTPException, OSError):
                with self._lock:
                    self.refusals += 1
                if smtp is not None:
                    try:
                        smtp.close()
                    except OSError:
                        pass
                smtp = None
                time.sleep(0.3)
                continue
            with self._lock:
                self.acknowledged.add(i)
            pending.pop(0)
        if smtp is not None:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass


# --- the tally ---------------------------------------------------------------------------


@dataclass
class Tally:
    scenario: str
    acknowledged: int
    lost: int  # acknowledged, but no share
    duplicated_shares: int  # a message that made more than one share
    undelivered: int  # acknowledged, but no link e-mail reached the relay
    duplicate_sends: int  # copies of an e-mail the relay got more than once (same Message-ID)
    resent_with_new_message_id: int  # must be 0: a recipient's client could not collapse it
    recovery_seconds: float | None = None
    note: str = ""

    def report(self) -> None:
        print(f"\n{self.scenario}: " + ", ".join(f"{k} {v}" for k, v in asdict(self).items()
                                                 if k != "scenario"))
        if REPORT:
            with open(REPORT, "a") as f:
                f.write(json.dumps(asdict(self)) + "\n")


def links_by_recipient(sink: SmtpSink) -> dict[str, list[str]]:
    """Message-IDs of the link e-mails the relay got, by recipient."""
    found: dict[str, list[str]] = {}
    for received in sink.messages:
        for to in received.rcpt_tos:
            if to != MEMBER:
                found.setdefault(to, []).append(str(received.message["Message-ID"]))
    return found


def delivered(sink: SmtpSink, numbers: set[int]) -> bool:
    links = links_by_recipient(sink)
    return all(recipient(i) in links for i in numbers)


def settled(site: Site) -> bool:
    runtime = site.runtime()
    try:
        busy = (InboundMessage.select().where(InboundMessage.state << ("queued", "processing"))
                .count()
                + OutboundMessage.select().where(OutboundMessage.state << ("queued", "sending"))
                .count())
        return busy == 0
    finally:
        runtime.db.close()


def tally(site: Site, scenario: str, acknowledged: set[int],
          recovery_seconds: float | None = None, note: str = "") -> Tally:
    runtime = site.runtime()
    try:
        shares = Counter(g.address for g in Grant.select(Grant.address))
    finally:
        runtime.db.close()
    links = links_by_recipient(site.sink)
    ids = Counter(str(r.message["Message-ID"]) for r in site.sink.messages)
    return Tally(
        scenario=scenario,
        acknowledged=len(acknowledged),
        lost=sum(1 for i in acknowledged if shares[recipient(i)] == 0),
        duplicated_shares=sum(1 for n in shares.values() if n > 1),
        undelivered=sum(1 for i in acknowledged if recipient(i) not in links),
        duplicate_sends=sum(n - 1 for n in ids.values()),
        resent_with_new_message_id=sum(1 for found in links.values() if len(set(found)) > 1),
        recovery_seconds=None if recovery_seconds is None else round(recovery_seconds, 1),
        note=note)


def log_lines(text: str, fragment: str) -> list[str]:
    return [line for line in text.splitlines() if fragment in line]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped by init has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """`pid` and the processes it started, and theirs (read from /proc)."""
    found = [pid]
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return []
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in children:
            found += descendants(int(child))
    return found
