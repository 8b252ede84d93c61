"""A private Dovecot IMAP server for tests, in a temporary directory with its own users.

Dovecot runs its login processes as the `dovecot`/`dovenull` users, so this needs root and the
`dovecot-imapd` package; `available()` says whether both are there. scripts/test installs the
package and sets MAILBRIDGE_TEST_REQUIRE_DOVECOT=1, so there a missing server fails the tests.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from imapclient import IMAPClient

from tests.helpers import reachable_dir
from tests.ports import free_port  # noqa: F401 (imported from here by tests)

PASSWORD = "secret"  # noqa: S105 - a throw-away test account


def available() -> str:
    """"" when a Dovecot can be started here, else why not."""
    if shutil.which("dovecot") is None or shutil.which("doveadm") is None:
        return "dovecot is not installed (apt-get install dovecot-imapd)"
    if os.geteuid() != 0:
        return "the test Dovecot needs root (it runs its logins as the dovecot user)"
    try:
        pwd.getpwnam("dovecot")
        pwd.getpwnam("dovenull")
    except KeyError:
        return "the dovecot and dovenull users are missing (reinstall dovecot-core)"
    if shutil.which("openssl") is None:
        return "openssl is not installed"
    return ""


def _running(pid: int) -> bool:
    """The daemon is not our child, so once it exits it may linger as a zombie until init
    reaps it; a zombie no longer listens or holds files."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


CONFIG = """\
base_dir = {d}/run
state_dir = {d}/run
protocols = imap
listen = 127.0.0.1
ssl = {ssl}
{ssl_files}
disable_plaintext_auth = no
auth_mechanisms = plain login{oauth2_mechanisms}
log_path = {d}/dovecot.log
# No stats process: a login process waiting for it would delay every stop by seconds.
stats_writer_socket_path =
mail_location = maildir:~/Maildir
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
first_valid_uid = {uid}
{capability}
service imap-login {{
  inet_listener imap {{
    port = {port}
  }}
  inet_listener imaps {{
    port = {imaps_port}
  }}
  chroot =
}}
service anvil {{
  chroot =
}}
{oauth2_passdb}passdb {{
  driver = passwd-file
  args = scheme=SHA512-CRYPT {d}/passwd
}}
userdb {{
  driver = passwd-file
  args = {d}/passwd
}}
"""


class Dovecot:
    """`with Dovecot(tls=True) as server:`; `server.port` speaks IMAP (with STARTTLS when
    `tls`), `server.imaps_port` implicit TLS (0 without `tls`); `server.ca_file` is the
    self-signed certificate to trust. `capabilities` replaces what the server announces
    (e.g. without IDLE or MOVE, to exercise the fallbacks). `oauth2_introspection_url` adds
    SASL XOAUTH2/OAUTHBEARER checked by Dovecot's oauth2 passdb, which POSTs each token to
    that RFC 7662 endpoint and lets the login in when it answers active for that user."""

    def __init__(self, *, users=("share@example.test",), spare: int = 0, tls: bool = False,
                 capabilities: str | None = None, oauth2_introspection_url: str = "") -> None:
        self.dir = reachable_dir("mailbridge-dovecot-")  # the dovecot user reaches the mail
        self._spare = [f"share{n}@example.test" for n in range(spare, 0, -1)]
        self.users = [*users, *self._spare]
        self._hash: str | None = None
        self.tls = tls
        self.capabilities = capabilities
        self.oauth2_introspection_url = oauth2_introspection_url
        self.port = free_port()
        self.imaps_port = free_port() if tls else 0
        self.ca_file = self.dir / "cert.pem"
        self._pid: int | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Dovecot:
        try:
            self.setup()
            self.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _passwd_line(self, user: str) -> str:
        if self._hash is None:  # one hash serves every account: they share the password
            self._hash = subprocess.run(["doveadm", "pw", "-s", "SHA512-CRYPT", "-p", PASSWORD],
                                        check=True, capture_output=True,
                                        text=True).stdout.strip()
        dovecot = pwd.getpwnam("dovecot")
        return (f"{user}:{self._hash}:{dovecot.pw_uid}:{dovecot.pw_gid}::"
                f"{self.dir / 'mail' / user}\n")

    def fresh_user(self) -> str:
        """An account no test has used yet: one of `spare` made at start, else a new one
        (Dovecot re-reads its changed passwd file at most once a second, hence the wait)."""
        if self._spare:
            return self._spare.pop()
        user = f"extra{len(self.users)}@example.test"
        with open(self.dir / "passwd", "a") as fh:
            fh.write(self._passwd_line(user))
        self.users.append(user)
        time.sleep(1.1)
        return user

    def setup(self) -> None:
        dovecot = pwd.getpwnam("dovecot")
        (self.dir / "passwd").write_text("".join(self._passwd_line(u) for u in self.users))
        (self.dir / "mail").mkdir()
        (self.dir / "run").mkdir()
        shutil.chown(self.dir / "mail", dovecot.pw_uid, dovecot.pw_gid)
        ssl_files = ""
        if self.tls:
            key = self.dir / "key.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-days", "2", "-subj", "/CN=localhost",
                            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                            "-keyout", str(key), "-out", str(self.ca_file)],
                           check=True, capture_output=True)
            ssl_files = f"ssl_cert = <{self.ca_file}\nssl_key = <{key}"
        capability = f"imap_capability = {self.capabilities}" if self.capabilities else ""
        mechanisms = passdb = ""
        if self.oauth2_introspection_url:
            mechanisms = " xoauth2 oauthbearer\n# A refused token answers at once (tests).\n" \
                         "auth_failure_delay = 0"
            (self.dir / "oauth2.conf").write_text(
                "introspection_mode = post\n"
                f"introspection_url = {self.oauth2_introspection_url}\n"
                "username_attribute = username\nactive_attribute = active\n"
                "active_value = true\n")
            passdb = ("passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
                      f"  args = {self.dir}/oauth2.conf\n}}\n")
        (self.dir / "dovecot.conf").write_text(CONFIG.format(
            d=self.dir, ssl="yes" if self.tls else "no", ssl_files=ssl_files,
            uid=dovecot.pw_uid, capability=capability, port=self.port,
            imaps_port=self.imaps_port, oauth2_mechanisms=mechanisms, oauth2_passdb=passdb))

    def start(self, timeout: float = 10.0) -> None:
        # Not a pipe: the daemon keeps inherited descriptors open, so a pipe never ends.
        with open(self.dir / "start.err", "wb") as err:
            started = subprocess.run(["dovecot", "-c", str(self.dir / "dovecot.conf")],
                                     stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        if started.returncode != 0:
            raise RuntimeError("dovecot did not start: "
                               + (self.dir / "start.err").read_text(errors="replace"))
        pid_file = self.dir / "run" / "master.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._pid is None and pid_file.exists() and pid_file.read_text().strip():
                self._pid = int(pid_file.read_text())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                time.sleep(0.05)
                continue
            if self._pid is not None:
                return
        self.stop()
        raise TimeoutError(f"dovecot did not listen in time; log:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the master (it ends every IMAP session) and wait until it is gone."""
        if self._pid is None:
            return
        pid, self._pid = self._pid, None
        # IMAP sessions outlive their master (and would keep serving the mailbox); a stopped
        # server, as after a reboot, has none left.
        processes = [pid, *_children(pid)]
        deadline = time.monotonic() + timeout
        for process in processes:
            try:
                os.kill(process, 15)
            except ProcessLookupError:
                pass
            while _running(process):
                if time.monotonic() > deadline:
                    raise TimeoutError("dovecot did not stop in time")
                time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        path = self.dir / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- as a mail client would --------------------------------------------------------------

    def client(self, user: str | None = None) -> IMAPClient:
        client = IMAPClient("127.0.0.1", port=self.port, ssl=False, timeout=30)
        client.login(user or self.users[0], PASSWORD)
        return client

    def append(self, *messages: bytes, folder: str = "INBOX", user: str | None = None) -> None:
        with self.client(user) as client:
            if len(messages) > 1 and client.has_capability("MULTIAPPEND"):
                for start in range(0, len(messages), 200):
                    typ, data = client.multiappend(folder, messages[start:start + 200])
                    if typ != "OK":
                        raise RuntimeError(f"APPEND failed: {data}")
            else:
                for raw in messages:
                    client.append(folder, raw)

    def count(self, folder: str = "INBOX", user: str | None = None) -> int:
        """Messages in `folder` (server spelling, e.g. "mailbridge.processed"); 0 if absent."""
        with self.client(user) as client:
            if not client.folder_exists(folder):
                return 0
            return int(client.folder_status(folder, [b"MESSAGES"])[b"MESSAGES"])

    def fetch_all(self, folder: str, user: str | None = None) -> list[bytes]:
        with self.client(user) as client:
            client.select_folder(folder, readonly=True)
            uids = client.search(["ALL"])
            return [data[b"BODY[]"] for data in client.fetch(uids, ["BODY.PEEK[]"]).values()]

    def seen(self, folder: str, user: str | None = None) -> list[bool]:
        """Per message, whether it carries \\Seen."""
        with self.client(user) as client:
            client.select_folder(folder, readonly=True)
            flags = client.get_flags(client.search(["ALL"]))
            return [b"\\Seen" in f for f in flags.values()]

    def uidvalidity(self, folder: str = "INBOX", user: str | None = None) -> int:
        with self.client(user) as client:
            return int(client.folder_status(folder, [b"UIDVALIDITY"])[b"UIDVALIDITY"])

    def set_uidvalidity(self, value: int, folder: str = "INBOX", user: str | None = None) -> None:
        """What a server does when it rebuilds a folder: all cached UIDs become meaningless."""
        subprocess.run(["doveadm", "-c", str(self.dir / "dovecot.conf"), "mailbox", "update",
                        "-u", user or self.users[0], "--uid-validity", str(value), folder],
                       check=True, capture_output=True)


def require() -> None:
    """Skip the calling test when no Dovecot can run here; fail instead where scripts/test
    promised one (MAILBRIDGE_TEST_REQUIRE_DOVECOT=1)."""
    import pytest

    reason = available()
    if reason:
        if os.environ.get("MAILBRIDGE_TEST_REQUIRE_DOVECOT") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def imap_env(server: Dovecot, user: str, password_file: Path, **extra: str) -> dict[str, str]:
    """MAILBRIDGE_IMAP_* overrides that point mailbridge at `user`'s mailbox on `server`."""
    password_file.write_text(PASSWORD)
    env = {
        "MAILBRIDGE_IMAP_ENABLED": "true",
        "MAILBRIDGE_IMAP_HOST": "127.0.0.1",
        "MAILBRIDGE_IMAP_PORT": str(server.port),
        "MAILBRIDGE_IMAP_SECURITY": "none",
        "MAILBRIDGE_IMAP_USERNAME": user,
        "MAILBRIDGE_IMAP_PASSWORD_FILE": str(password_file),
    }
    env.update({f"MAILBRIDGE_IMAP_{k.upper()}": v for k, v in extra.items()})
    return env
