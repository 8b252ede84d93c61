"""A private Postfix (and OpenDKIM / OpenDMARC milters) for tests, in front of mailbridge.

Each `PostfixInstance` has its own `config_directory`, queue, data directory and log file and
listens on loopback ports of its own; the machine's own Postfix configuration is never read or
changed (as root, `postfix -c` needs no `alternate_config_directories` entry, see postfix(1)).
The configuration is the one `docs/deploy/postfix.md` recommends, with test-only differences
marked here: the ports, no chroot, and mail for anywhere but our domains held in the queue
(`retry:`) so that a bounce Postfix would send (backscatter) stays visible in `queue_ids()`.

The OpenDKIM and OpenDMARC milters that go in front of it are in `tests/milters.py`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.helpers import reachable_dir
from tests.ports import free_port  # noqa: F401 (imported from here by tests)

AUTHSERV_ID = "mx.portal.example"
DOMAINS = ("portal.example", "reply.portal.example")
OUTSIDE_CLIENT = "127.0.0.2"  # the "internet": a client outside Postfix's mynetworks
MASTER_CF = Path("/usr/share/postfix/master.cf.dist")
PUBLIC_SUFFIXES = Path("/usr/share/publicsuffix/public_suffix_list.dat")
POSTFIX_TOOLS = ("postfix", "postconf", "postmap", "postqueue", "postsuper")


def missing_tools(milters: bool = False) -> list[str]:
    """What this machine lacks to run the instance (and its milters); empty when usable."""
    missing = [t for t in POSTFIX_TOOLS if shutil.which(t) is None]
    if milters:
        missing += [t for t in ("opendkim", "opendmarc", "unshare") if shutil.which(t) is None]
    if not MASTER_CF.exists():
        missing.append(str(MASTER_CF))
    if os.geteuid() != 0:
        missing.append("root (Postfix's master runs as root)")
    return missing


def require(milters: bool = False) -> None:
    """Skip (or fail, where scripts/test installed them) when Postfix cannot run here."""
    import pytest

    missing = missing_tools(milters)
    if missing:
        message = f"Postfix tests need: {', '.join(missing)}"
        if os.environ.get("MAILBRIDGE_TEST_REQUIRE_POSTFIX") == "1":
            pytest.fail(message)
        pytest.skip(message)


def wait_port(host: str, port: int, timeout: float = 10.0, process=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with status {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


def service_dir(prefix: str = "mailbridge-mx-") -> Path:
    """A fresh directory the daemons' own users (postfix, opendkim, opendmarc) can reach:
    pytest's tmp_path is private to root (0700 all the way up). Remove it with
    shutil.rmtree when done."""
    return reachable_dir(prefix)


def _run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip() or done.stdout}")
    return done.stdout


def _master_cf(smtpd_port: int) -> str:
    """Debian's master.cf without chroot (a private instance has no chroot prepared), with
    smtpd on our loopback port instead of 25."""
    lines = []
    for line in MASTER_CF.read_text().splitlines():
        fields = line.split()
        if line[:1] not in ("", "#", " ", "\t") and len(fields) >= 8:
            if fields[:2] == ["smtp", "inet"]:
                fields[0] = f"127.0.0.1:{smtpd_port}"
            fields[4] = "n"
            line = "  ".join(fields)
        lines.append(line)
    return "\n".join(lines) + "\n"


class PostfixInstance:
    """`with PostfixInstance(tmp_path, mailbridge_port=N) as mx:` relays DOMAINS to mailbridge.

    directory: from `service_dir()` (the postfix user must reach it).
    transport: "smtp" (to 127.0.0.1:mailbridge_port) or "lmtp" (`lmtp:inet:`, same port; or
    `lmtp:unix:` when `mailbridge_socket` names a Unix socket).
    policy_port: adds `check_policy_service inet:127.0.0.1:N` before permit_mynetworks.
    milters: "inet:127.0.0.1:N" specs, in order (OpenDKIM before OpenDMARC).
    """

    def __init__(self, directory: Path, *, mailbridge_port: int = 0, transport: str = "smtp",
                 mailbridge_socket: str | None = None, policy_port: int | None = None,
                 milters: Sequence[str] = (), domains: Iterable[str] = DOMAINS) -> None:
        if transport not in ("smtp", "lmtp"):
            raise ValueError("transport must be 'smtp' or 'lmtp'")
        self.dir = Path(directory)
        self.conf = self.dir / "conf"
        self.port = free_port()
        self.mailbridge_port = mailbridge_port
        self.mailbridge_socket = mailbridge_socket
        self.transport = transport
        self.policy_port = policy_port
        self.milters = list(milters)
        self.domains = list(domains)
        self.logfile = self.dir / "maillog"
        self._running = False

    # --- set-up --------------------------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        restrictions = ["permit_mynetworks", "reject_unauth_destination"]
        if self.policy_port is not None:
            # Before permit_mynetworks: otherwise local clients would skip the policy check.
            restrictions.insert(0, f"check_policy_service inet:127.0.0.1:{self.policy_port}")
        values = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.dir / "queue"),
            "data_directory": str(self.dir / "data"),
            "maillog_file": str(self.logfile),
            "maillog_file_prefixes": str(self.dir),
            "syslog_name": "postfix-test",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": AUTHSERV_ID,
            "mydestination": "",
            "mynetworks": "127.0.0.1/32",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": ", ".join(self.domains),
            "transport_maps": f"hash:{self.conf / 'transport'}",
            "smtpd_recipient_restrictions": ", ".join(restrictions),
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            "lmtp_tls_security_level": "none",
            # Test only: nothing leaves this machine; mail for other domains (a bounce to a
            # sender, say) waits in the queue where queue_ids() sees it.
            "default_transport": "retry:held by the test instance",
            "relay_transport": "retry:held by the test instance",
            "smtp_dns_support_level": "disabled",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        }
        if self.milters:
            values.update({
                "smtpd_milters": ", ".join(self.milters),
                "non_smtpd_milters": "",
                "milter_default_action": "tempfail",  # no milter, no mail: never unverified
                "milter_protocol": "6",
            })
        return values

    def transport_map(self) -> str:
        if self.transport == "smtp":
            nexthop = f"smtp:[127.0.0.1]:{self.mailbridge_port}"
        elif self.mailbridge_socket:
            nexthop = f"lmtp:unix:{self.mailbridge_socket}"
        else:
            nexthop = f"lmtp:inet:127.0.0.1:{self.mailbridge_port}"
        return "".join(f"{domain} {nexthop}\n" for domain in self.domains)

    def start(self) -> PostfixInstance:
        for parent in self.dir.resolve().parents:
            if parent.exists() and not parent.stat().st_mode & 0o001:
                raise ValueError(f"{parent} is closed to other users, so Postfix's own user "
                                 "cannot reach its files: use tests.postfix.service_dir()")
        for sub in ("conf", "queue", "data"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.conf.chmod(0o755)
        (self.conf / "main.cf").write_text("")
        (self.conf / "master.cf").write_text(_master_cf(self.port))
        self.postconf(self.main_cf())
        (self.conf / "transport").write_text(self.transport_map())
        _run("postmap", "-c", str(self.conf), f"hash:{self.conf / 'transport'}")
        shutil.chown(self.dir / "data", "postfix", "postfix")
        self.postfix("post-install", "create-missing")
        self.postfix("start")
        self._running = True
        wait_port("127.0.0.1", self.port)
        return self

    def postconf(self, values: dict[str, str]) -> None:
        _run("postconf", "-c", str(self.conf), "-e",
             *(f"{key} = {value}" for key, value in values.items()))

    def postfix(self, *command: str) -> str:
        return _run("postfix", "-c", str(self.conf), *command)

    def reload(self, **values: str) -> None:
        """Change main.cf settings and have the running instance pick them up."""
        self.postconf(values)
        self.postfix("reload")

    def stop(self) -> None:
        if self._running:
            self._running = False
            self.postfix("stop")

    def __enter__(self) -> PostfixInstance:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- use ------------------------------------------------------------------------------

    @property
    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def send(self, raw: bytes, sender: str, rcpts: Sequence[str],
             client: str = OUTSIDE_CLIENT) -> dict:
        """Deliver to this Postfix over SMTP from `client` (by default an address outside
        mynetworks, as mail from the internet is). Returns smtplib's refused recipients;
        raises SMTPRecipientsRefused when all are refused, as smtplib does."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30,
                          source_address=(client, 0)) as smtp:
            return smtp.sendmail(sender, list(rcpts), raw)

    def queue(self) -> list[dict]:
        """The queue's entries (postqueue -j of this instance), bounces included."""
        out = _run("postqueue", "-c", str(self.conf), "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def queue_ids(self) -> list[str]:
        return [entry["queue_id"] for entry in self.queue()]

    def flush(self) -> None:
        _run("postqueue", "-c", str(self.conf), "-f")

    def clear_queue(self) -> None:
        _run("postsuper", "-c", str(self.conf), "-d", "ALL")

    def mark(self) -> int:
        """Where the log ends now: pass as `since` to look only at what comes after."""
        return len(self.log)

    def wait_log(self, pattern: str, *, count: int = 1, since: int = 0,
                 timeout: float = 15.0) -> list[str]:
        """Log lines (after `since`) matching the regex `pattern`, once `count` exist."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.log[since:].splitlines() if re.search(pattern, line)]
            if len(lines) >= count:
                return lines
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(lines)} of {count} log lines match {pattern!r}; "
                                   f"log ends:\n" + "\n".join(self.log.splitlines()[-20:]))
            time.sleep(0.1)

    def wait_delivered(self, count: int = 1, *, since: int = 0,
                       timeout: float = 15.0) -> list[str]:
        """Wait for `count` deliveries to mailbridge (after `since`), then an empty queue."""
        relay = "lmtp" if self.transport == "lmtp" else "smtp"
        lines = self.wait_log(rf"postfix-test/{relay}\[\d+\]: .* status=sent", count=count,
                              since=since, timeout=timeout)
        self.wait_queue_empty(timeout)
        return lines

    def wait_queue_empty(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.queue_ids():
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue not empty: {self.queue()}")
            time.sleep(0.1)
