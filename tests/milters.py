"""OpenDKIM and OpenDMARC as milters for the test Postfix (`tests/postfix.py`).

Both run as the Debian packages' daemons with configuration files of their own, on loopback
ports, with the settings docs/deploy/postfix.md gives. OpenDKIM takes DKIM keys from
`TestDNSData` (its option for automated testing); OpenDMARC has no such option, so it runs in
a private mount namespace whose `/etc/resolv.conf` names a stub DNS server
(`tests/stub_dns.py`) holding the `_dmarc` records; the machine's resolver is left alone.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.postfix import AUTHSERV_ID, PUBLIC_SUFFIXES, free_port, wait_port


class _Daemon:
    """A milter daemon in the foreground, its output in a log file, stopped with SIGTERM."""

    name = "milter"

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory) / self.name
        self.port = free_port()
        self.logfile = self.dir / "output.log"
        self.process: subprocess.Popen | None = None

    @property
    def spec(self) -> str:
        """How Postfix names it in smtpd_milters."""
        return f"inet:127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        raise NotImplementedError

    def start(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.prepare()
        with open(self.logfile, "wb") as out:
            self.process = subprocess.Popen(self.command(), stdout=out,
                                            stderr=subprocess.STDOUT)
        try:
            wait_port("127.0.0.1", self.port, process=self.process)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {exc}\n{self.log}") from exc
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                # OpenDMARC's libmilter lingers 5 s after SIGTERM; a test milter needs no grace.
                self.process.wait(1)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o644)
    return path


class OpenDkim(_Daemon):
    """OpenDKIM verifying (mode v) with keys from `keys`: {"selector._domainkey.domain": TXT}."""

    name = "opendkim"

    def __init__(self, directory: Path, keys: dict[str, bytes | str],
                 authserv_id: str = AUTHSERV_ID) -> None:
        super().__init__(directory)
        self.keys = keys
        self.authserv_id = authserv_id

    def prepare(self) -> None:
        # A data set file is "name value" per line; the record's own spaces are left out.
        lines = []
        for name, record in self.keys.items():
            text = record.decode() if isinstance(record, bytes) else record
            compact = re.sub(r"\s+", "", text)
            lines.append(f"{name} {compact}\n")
        keys = _write(self.dir / "test-dns", "".join(lines))
        _write(self.dir / "opendkim.conf", "\n".join([
            *self.recipe_lines(),
            f"Socket inet:{self.port}@127.0.0.1",
            f"TestDNSData file:{keys}",  # test only: DNS answers from this file
            "Background no",
            "Syslog no",
            "UserID opendkim",
        ]) + "\n")

    def recipe_lines(self) -> list[str]:
        """The settings docs/deploy/postfix.md gives for the MX in front of mailbridge."""
        return [
            "Mode v",
            f"AuthservID {self.authserv_id}",
            "AlwaysAddARHeader yes",
            "Canonicalization relaxed/simple",
        ]

    def command(self) -> list[str]:
        return ["opendkim", "-f", "-x", str(self.dir / "opendkim.conf")]


class OpenDmarc(_Daemon):
    """OpenDMARC reading OpenDKIM's results (same authserv-id); `_dmarc` TXT records come
    from `dns` (a StubDns) through a private resolv.conf in its own mount namespace."""

    name = "opendmarc"

    def __init__(self, directory: Path, dns, authserv_id: str = AUTHSERV_ID) -> None:
        super().__init__(directory)
        self.dns = dns
        self.authserv_id = authserv_id

    def prepare(self) -> None:
        resolv = _write(self.dir / "resolv.conf", self.dns.resolv_conf())
        lines = [
            *self.recipe_lines(),
            f"Socket inet:{self.port}@127.0.0.1",
            "Syslog false",
            "UserID opendmarc",
        ]
        if PUBLIC_SUFFIXES.exists():
            lines.append(f"PublicSuffixList {PUBLIC_SUFFIXES}")
        _write(self.dir / "opendmarc.conf", "\n".join(lines) + "\n")
        self.resolv = resolv

    def recipe_lines(self) -> list[str]:
        return [
            f"AuthservID {self.authserv_id}",
            f"TrustedAuthservIDs {self.authserv_id}",
            "RequiredHeaders true",
            "SPFSelfValidate false",
            "RejectFailures false",
        ]

    def command(self) -> list[str]:
        # The bind mount exists only in the new mount namespace: the machine's resolver
        # configuration is untouched.
        script = ('mount --bind "$1" /etc/resolv.conf && exec opendmarc -f -c "$2"')
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                str(self.resolv), str(self.dir / "opendmarc.conf")]
