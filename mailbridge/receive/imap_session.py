"""Connecting to the watched mailbox: TLS, login and folder names. Every failure is turned
into a plain-language `ImapProblem` that names the `[imap]` key to look at."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from imapclient import IMAPClient, SocketTimeout
from imapclient.exceptions import CapabilityError, IMAPClientAbortError, IMAPClientError, LoginError

from mailbridge.config import ConfigError
from mailbridge.settings import ImapSettings

CONNECT_TIMEOUT = 20.0
# A server that says nothing this long is gone; IDLE waits do not count (they poll the socket).
READ_TIMEOUT = 120.0


class ImapProblem(Exception):
    """A problem the operator fixes (or waits out). `key` names the setting, `text` explains
    it in plain language and may name the host or account (for the console, not the log)."""

    def __init__(self, key: str, text: str) -> None:
        super().__init__(f"{key}: {text}")
        self.key = key
        self.text = text


class Tokens(Protocol):
    """Where OAuth access tokens come from (receive/imap_oauth.TokenSource)."""

    def token(self, fresh: bool = False) -> str: ...


@dataclass(frozen=True)
class Folders:
    """The configured folders as the server spells them."""

    watch: str
    processed: str
    failed: str


def tls_context(imap: ImapSettings) -> ssl.SSLContext:
    """The system's trusted CAs, plus `[imap] ca_file` for a private or self-signed server."""
    context = ssl.create_default_context()
    if imap.ca_file:
        try:
            context.load_verify_locations(cafile=imap.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ImapProblem("[imap] ca_file", f"cannot read {imap.ca_file} as PEM "
                              f"certificates ({exc})") from None
    return context


def connect(imap: ImapSettings, password: str = "", tokens: Tokens | None = None
            ) -> IMAPClient:
    """A logged-in client, with the password or (`[imap] auth = "xoauth2"`) a token from
    `tokens`; raises ImapProblem."""
    if not imap.host.strip():
        raise ImapProblem("[imap] host", "not set")
    if not imap.username.strip():
        raise ImapProblem("[imap] username", "not set")
    if imap.auth == "xoauth2":
        if tokens is None:
            raise ImapProblem("[imap] auth", "xoauth2 needs a token source")
        try:
            return _open(imap, lambda client: client.oauth2_login(imap.username,
                                                                  tokens.token()))
        except LoginError:
            pass  # a token revoked or rotated before its expiry: once more with a new one
        except Exception as exc:
            raise explain(exc, imap) from None
        try:
            return _open(imap, lambda client: client.oauth2_login(imap.username,
                                                                  tokens.token(fresh=True)))
        except Exception as exc:
            raise explain(exc, imap) from None
    if not password:
        raise ImapProblem("[imap] password_env / password_file",
                          f"no password: set the environment variable {imap.password_env} or "
                          "name a file in [imap] password_file")
    try:
        return _open(imap, lambda client: client.login(imap.username, password))
    except Exception as exc:
        raise explain(exc, imap) from None


def _open(imap: ImapSettings, login: Callable[[IMAPClient], object]) -> IMAPClient:
    """Connected (TLS as configured) and logged in by `login`; raises what went wrong."""
    context = tls_context(imap) if imap.security != "none" else None
    client = None
    try:
        client = IMAPClient(imap.host, port=imap.port, ssl=imap.security == "tls",
                            ssl_context=context,
                            timeout=SocketTimeout(CONNECT_TIMEOUT, READ_TIMEOUT))
        if imap.security == "starttls":
            if not client.has_capability("STARTTLS"):
                raise ImapProblem("[imap] security",
                                  f"{imap.host}:{imap.port} does not offer STARTTLS; use "
                                  "security = \"tls\" (usually port 993)")
            client.starttls(context)
        login(client)
    except BaseException:
        if client is not None:
            close(client)
        raise
    return client


def explain(exc: BaseException, imap: ImapSettings) -> ImapProblem:
    """What went wrong, in words an operator can act on."""
    where = f"{imap.host}:{imap.port}"
    if isinstance(exc, ImapProblem):
        return exc
    if isinstance(exc, ConfigError):
        key, _, text = str(exc).partition(": ")
        return ImapProblem(key, text)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ImapProblem("[imap] ca_file",
                           f"the TLS certificate of {where} is not trusted "
                           f"({exc.verify_message}); if the server uses a private or "
                           "self-signed certificate, name its CA certificate in [imap] ca_file")
    if isinstance(exc, ssl.SSLError):
        return ImapProblem("[imap] security",
                           f"TLS with {where} failed ({exc.reason or exc}); check [imap] security "
                           "(\"tls\" for port 993, \"starttls\" for port 143) and [imap] port")
    if isinstance(exc, socket.gaierror):
        return ImapProblem("[imap] host", f"cannot find the host {imap.host!r} ({exc.strerror})")
    if isinstance(exc, ConnectionRefusedError):
        return ImapProblem("[imap] host / port", f"{where} refused the connection")
    if isinstance(exc, TimeoutError | socket.timeout):
        return ImapProblem("[imap] host / port", f"no answer from {where} in time")
    if isinstance(exc, LoginError) and imap.auth == "xoauth2":
        return _token_refused(imap, where, _server_text(exc))
    if isinstance(exc, LoginError):
        return ImapProblem("[imap] username / password_env",
                           f"{where} refused the login for {imap.username} "
                           f"({_server_text(exc)})")
    if isinstance(exc, OSError):
        return ImapProblem("[imap] host / port",
                           f"cannot talk to {where} ({exc.strerror or type(exc).__name__})")
    if isinstance(exc, IMAPClientAbortError):
        return ImapProblem("[imap] host", f"{where} closed the connection ({_server_text(exc)})")
    if isinstance(exc, CapabilityError):
        return ImapProblem("[imap] host", f"{where} lacks a needed capability ({exc})")
    if isinstance(exc, IMAPClientError):
        return ImapProblem("[imap] host", f"{where} answered with an error ({_server_text(exc)})")
    return ImapProblem("[imap]", f"unexpected {type(exc).__name__} while talking to {where}")


def _token_refused(imap: ImapSettings, where: str, server_text: str) -> ImapProblem:
    """The server refused a token the token service had just issued (the second try)."""
    if imap.oauth_provider == "microsoft":
        return ImapProblem("[imap] username / oauth_client_id",
                           f"{where} refused the token for {imap.username} ({server_text}): "
                           "the app needs the IMAP.AccessAsApp permission (admin consent), a "
                           "service principal in Exchange Online and FullAccess to this mailbox "
                           "(Add-MailboxPermission); see docs/deploy/imap-oauth.md")
    return ImapProblem("[imap] username / oauth_service_account_file",
                       f"{where} refused the token for {imap.username} ({server_text}): IMAP "
                       "must be on for the user and the token's scope https://mail.google.com/;"
                       " see docs/deploy/imap-oauth.md")


def _server_text(exc: BaseException) -> str:
    text = str(exc)
    if text.startswith("b'") or text.startswith('b"'):
        text = text[2:-1]
    return text[:200] or type(exc).__name__


def close(client: IMAPClient) -> None:
    """Log out if the connection still works, else just drop it."""
    try:
        client.logout()
    except Exception:  # a broken connection cannot log out; closing is all that is left
        try:
            client.shutdown()
        except Exception:
            pass


# --- folders -------------------------------------------------------------------------------


def server_folder(name: str, delimiter: str | None, prefix: str = "") -> str:
    """`name` uses "/" between levels; the server may use "." and want a personal prefix
    such as "INBOX." (Courier, old Cyrus)."""
    name = name.strip().strip("/")
    if name.upper() == "INBOX":
        return "INBOX"
    if delimiter and delimiter != "/":
        name = delimiter.join(name.split("/"))
    if prefix and not name.upper().startswith(prefix.upper()) \
            and not name.upper().startswith("INBOX" + (delimiter or "")):
        name = prefix + name
    return name


def hierarchy(client: IMAPClient) -> tuple[str | None, str]:
    """(delimiter, personal namespace prefix) of this server."""
    delimiter = None
    listed = client.list_folders("", "")
    if listed and listed[0][1]:
        delimiter = listed[0][1].decode() if isinstance(listed[0][1], bytes) else listed[0][1]
    prefix = ""
    if client.has_capability("NAMESPACE"):
        personal = client.namespace().personal or ()
        if personal:
            prefix = personal[0][0] or ""
            if isinstance(prefix, bytes):
                prefix = prefix.decode()
    return delimiter, prefix


def resolve_folders(client: IMAPClient, imap: ImapSettings) -> Folders:
    delimiter, prefix = hierarchy(client)
    return Folders(watch=server_folder(imap.folder, delimiter, prefix),
                   processed=server_folder(imap.processed_folder, delimiter, prefix),
                   failed=server_folder(imap.failed_folder, delimiter, prefix))


def ensure_folders(client: IMAPClient, folders: Folders) -> list[str]:
    """Create the processed and failed folders (and their parents) if missing; returns the
    names created. Created folders are subscribed so mail clients show them."""
    delimiter, _ = hierarchy(client)
    created: list[str] = []
    for key, folder in (("[imap] processed_folder", folders.processed),
                        ("[imap] failed_folder", folders.failed)):
        parts = folder.split(delimiter) if delimiter else [folder]
        for depth in range(1, len(parts) + 1):
            name = (delimiter or "").join(parts[:depth])
            if client.folder_exists(name):
                continue
            try:
                client.create_folder(name)
            except IMAPClientAbortError:
                raise
            except IMAPClientError as exc:
                if client.folder_exists(name):  # another poller created it meanwhile
                    continue
                raise ImapProblem(key, f"cannot create the folder {name!r} "
                                  f"({_server_text(exc)})") from None
            created.append(name)
            try:
                client.subscribe_folder(name)
            except IMAPClientAbortError:
                raise
            except IMAPClientError:
                pass  # some servers have no subscriptions; the folder exists all the same
    return created


def select(client: IMAPClient, folder: str, key: str = "[imap] folder") -> int:
    """Select `folder` for reading and moving; returns its UIDVALIDITY."""
    try:
        response = client.select_folder(folder)
    except IMAPClientAbortError:
        raise
    except IMAPClientError as exc:
        if not client.folder_exists(folder):
            raise ImapProblem(key, f"the mailbox has no folder {folder!r}") from None
        raise ImapProblem(key, f"cannot open the folder {folder!r} "
                          f"({_server_text(exc)})") from None
    return int(response[b"UIDVALIDITY"])
