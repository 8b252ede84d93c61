"""The settings every part of mailbridge reads: one frozen dataclass per section of
config.toml, with the defaults (`config.load_settings` fills and validates them)."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ALLOWED_TYPES = (
    "pdf", "png", "jpeg", "gif", "tiff", "heic", "docx", "doc", "xlsx", "rtf", "txt",
)


def _required() -> typing.Any:
    return field(metadata={"required": True})


@dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    base_url: str = _required()
    data_dir: Path = Path("var")
    master_key_file: str = ""  # empty: <data_dir>/master.key
    timezone: str = "UTC"
    log_level: str = "INFO"
    # Names this node's claims on queued work; empty: a random id kept in <data_dir>/node-id.
    # Nodes that share one data directory must each set their own.
    node_id: str = ""
    stop_timeout_seconds: float = 10.0  # SIGTERM to exit, under Docker's and systemd's grace


@dataclass(frozen=True, kw_only=True)
class DatabaseSettings:
    url: str = ""  # empty: sqlite:///<data_dir>/mailbridge.db


@dataclass(frozen=True, kw_only=True)
class SmtpSettings:
    host: str = "127.0.0.1"
    port: int = 2525
    max_message_bytes: int = 80 * 1024 * 1024
    # Hourly budgets (0: none); past them the client is asked to retry later (451 4.7.1).
    # Trusted relays have no per-IP budget (all of an MTA's mail comes from its address).
    max_messages_per_hour_per_ip: int = 500
    max_bytes_per_hour_per_ip: int = 2 * 1024 ** 3
    max_messages_per_hour_per_sender: int = 200
    max_bytes_per_hour_per_sender: int = 1024 ** 3
    # STARTTLS is offered when both are set; SIGHUP makes `serve` read them again.
    tls_cert_file: str = ""  # PEM certificate chain, server certificate first
    tls_key_file: str = ""
    require_tls: bool = False  # refuse MAIL before STARTTLS (530 5.7.0)
    implicit_tls_port: int = 0  # a second listener speaking TLS from the start; 0: off


@dataclass(frozen=True, kw_only=True)
class PolicySettings:
    """The Postfix policy service: an MTA in front asks at RCPT whether to take a message."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 10040


@dataclass(frozen=True, kw_only=True)
class LmtpSettings:
    """LMTP intake for an MTA in front (Postfix's lmtp: transport): a TCP port or a Unix
    socket; one answer per recipient after DATA."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 2424
    socket: str = ""  # a Unix socket path instead of host/port


@dataclass(frozen=True, kw_only=True)
class AddressSettings:
    sharing: str = _required()
    reply_domain: str = _required()


@dataclass(frozen=True, kw_only=True)
class RelaySettings:
    host: str = "127.0.0.1"
    port: int = 25
    tls: str = ""  # "starttls" (the default), "implicit" or "none"; see `tls_mode`
    ca_file: str = ""  # CA certificates (PEM) to trust instead of the system's
    starttls: bool | None = None  # deprecated: true means tls = "starttls", false "none"
    username: str = ""
    password_env: str = "MAILBRIDGE_RELAY_PASSWORD"  # noqa: S105 - a variable name
    password_file: str = ""
    timeout_seconds: float = 30.0

    @property
    def tls_mode(self) -> str:
        """`tls` if set, else what the deprecated `starttls` said, else "starttls"."""
        if self.tls:
            return self.tls
        return "none" if self.starttls is False else "starttls"


@dataclass(frozen=True, kw_only=True)
class OutboundSettings:
    transport: str = "maildir"
    from_: str = _required()  # the address; "Document Portal <no-reply@…>" names the service
    from_name: str = ""  # the display name given in `from`, else the service's own name
    maildir: str = ""  # empty: <data_dir>/outbox
    max_attempts: int = 8
    retry_base_seconds: float = 60.0
    retry_max_seconds: float = 3600.0
    smtp: RelaySettings = field(default_factory=RelaySettings)


@dataclass(frozen=True, kw_only=True)
class WebSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    session_idle_minutes: float = 15.0
    session_absolute_hours: float = 12.0
    # Where Flask-Limiter keeps its counters; memory:// is per process (one waitress process).
    # Several gunicorn workers or nodes need a shared store, e.g. redis://host:6379.
    ratelimit_storage_uri: str = "memory://"
    proxies: int = 0  # reverse proxies in front that set X-Forwarded-For/-Proto
    # waitress: a slow or stalled client holds a connection, not a thread; only complete
    # requests reach the threads.
    threads: int = 8
    connection_limit: int = 1000
    channel_timeout: float = 30.0  # seconds a connection may stay silent
    cleanup_interval: float = 10.0  # how often silent connections are looked for
    # A request body over 512 KB (documents sent back) waits here until it is complete:
    # "" looks for a memory file system ($RUNTIME_DIRECTORY, then /dev/shm).
    body_buffer_dir: str = ""


@dataclass(frozen=True, kw_only=True)
class ShareSettings:
    claim_hours: float = 24.0
    remind_before_hours: float = 4.0  # 0, or not less than claim_hours: no reminder
    max_extend_hours: float = 168.0  # cap for `extend [hours]`
    allow_clinic_admins: bool = False  # admins of the sender's clinic may manage by reply too
    access_request_hours: float = 72.0  # an unanswered request for access lapses after this


@dataclass(frozen=True, kw_only=True)
class NotificationSettings:
    first_view: bool = True  # sender: a recipient opened the share for the first time
    expiry_summary: bool = True  # sender: which recipients let their link lapse
    delivery_failure: bool = True  # sender: a link e-mail could not be delivered
    recipient_revoked: bool = True  # recipient: access was withdrawn (no PHI)


@dataclass(frozen=True, kw_only=True)
class RetentionSettings:
    spool_days: float = 30.0  # raw inbound messages (documents stay in shares)
    session_days: float = 30.0  # ended portal sessions
    code_days: float = 1.0  # spent one-time codes and reset links
    # Files no row references (a crash between writing and committing) are removed once this
    # old: the margin covers a transaction still committing, also on another node.
    orphan_hours: float = 1.0
    # Audit events older than this are pruned behind a signed checkpoint; 0: kept for good.
    audit_retention_days: float = 0.0


@dataclass(frozen=True, kw_only=True)
class SenderSettings:
    require_authentication: bool = True
    trusted_authserv_ids: tuple[str, ...] = ()
    # SMTP clients (IPs or networks) that can be the MTA writing those Authentication-Results:
    # by default an MTA on this host. Mail from anyone else is judged by our own DKIM check.
    trusted_relays: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True, kw_only=True)
class LimitSettings:
    max_recipients: int = 20
    max_parts: int = 100
    max_depth: int = 8
    max_file_bytes: int = 30 * 1024 * 1024
    max_total_bytes: int = 60 * 1024 * 1024
    inline_image_max_bytes: int = 64 * 1024
    allowed_types: tuple[str, ...] = DEFAULT_ALLOWED_TYPES


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    lease_seconds: float = 60.0  # renewed while held; a crashed node's work waits this long
    max_attempts: int = 5
    retry_base_seconds: float = 30.0
    # Database or storage trouble: the message waits (attempts not counted), back-off capped here.
    retry_max_seconds: float = 300.0
    poll_seconds: float = 5.0
    # Worker processes beside the SMTP listener, each running the spool worker and the outbox
    # dispatcher with its own database connections; 0: both run as threads inside `serve`.
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    batch: int = 4  # spooled messages a worker takes at once (other workers take the next ones)


@dataclass(frozen=True, kw_only=True)
class ImapSettings:
    """Intake from an existing mailbox. Folder names use "/" between levels whatever the
    server's own separator is."""

    enabled: bool = False
    host: str = ""
    port: int = 993
    security: str = "tls"  # "tls" (port 993), "starttls" (port 143) or "none"
    username: str = ""
    password_env: str = "MAILBRIDGE_IMAP_PASSWORD"  # noqa: S105 - a variable name
    password_file: str = ""
    ca_file: str = ""  # extra CA certificates (PEM) for a server with a private certificate
    folder: str = "INBOX"
    processed_folder: str = "mailbridge/processed"
    failed_folder: str = "mailbridge/failed"
    poll_seconds: float = 60.0  # when the server does not offer IDLE
    batch_size: int = 50
    # OAuth 2.0 (SASL XOAUTH2) instead of a password: Microsoft 365 refuses password IMAP.
    auth: str = "password"  # "password" or "xoauth2"
    oauth_provider: str = ""  # "microsoft" (client credentials) or "google"
    oauth_tenant: str = ""  # Microsoft: the directory (tenant) ID or a verified domain
    # Microsoft: the app registration's client ID; Google's refresh-token flow: the OAuth client.
    oauth_client_id: str = ""
    oauth_client_secret_env: str = "MAILBRIDGE_IMAP_OAUTH_CLIENT_SECRET"  # noqa: S105 - a name
    oauth_client_secret_file: str = ""
    # Google: a service account's key (JSON) with domain-wide delegation for the mailbox...
    oauth_service_account_file: str = ""
    # ...or, without one, a refresh token the mailbox's user granted to the OAuth client.
    oauth_refresh_token_env: str = "MAILBRIDGE_IMAP_OAUTH_REFRESH_TOKEN"  # noqa: S105 - a name
    oauth_refresh_token_file: str = ""
    oauth_scope: str = ""  # empty: the provider's IMAP scope
    oauth_authority: str = ""  # Microsoft; empty: https://login.microsoftonline.com/<tenant>
    token_url: str = ""  # Google; empty: the key file's token_uri, else Google's
    oauth_ca_file: str = ""  # CA certificates (PEM) for the token service instead of the system's


@dataclass(frozen=True, kw_only=True)
class MetricsSettings:
    """`/metrics` for Prometheus on a listener of its own, never on the public portal. On by
    default because it listens on loopback only: counts and queue depths, no PHI, but still
    nothing for the internet to read."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True)
class StorageSettings:
    # Where encrypted documents and spooled messages are kept: "local" (files under data_dir,
    # the embedded default) or "database" (rows in [database], read by every node).
    backend: str = "local"


@dataclass(frozen=True, kw_only=True)
class DocumentSettings:
    """How documents are handed out. A clinic's own `watermark` (`clinics set`) wins."""

    # Every PDF page and image viewed or downloaded carries "Shared with <address> · <date> ·
    # share <id>", stamped on the fly; the stored original is never changed.
    watermark: bool = False


@dataclass(frozen=True, kw_only=True)
class Settings:
    service: ServiceSettings
    database: DatabaseSettings
    smtp: SmtpSettings
    addresses: AddressSettings
    outbound: OutboundSettings
    web: WebSettings
    shares: ShareSettings
    notifications: NotificationSettings
    retention: RetentionSettings
    senders: SenderSettings
    limits: LimitSettings
    worker: WorkerSettings
    imap: ImapSettings = field(default_factory=ImapSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    lmtp: LmtpSettings = field(default_factory=LmtpSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    documents: DocumentSettings = field(default_factory=DocumentSettings)

    @property
    def sharing_local(self) -> str:
        return self.addresses.sharing.split("@", 1)[0]

    @property
    def sharing_domain(self) -> str:
        return self.addresses.sharing.split("@", 1)[1]

    @property
    def own_domains(self) -> frozenset[str]:
        return frozenset({self.sharing_domain, self.addresses.reply_domain,
                          self.outbound.from_.rsplit("@", 1)[-1]})

    @property
    def spool_dir(self) -> Path:
        return self.service.data_dir / "spool"

    @property
    def documents_dir(self) -> Path:
        return self.service.data_dir / "documents"

    @property
    def sqlite_path(self) -> Path | None:
        """The database file, when the database is SQLite."""
        url = self.database.url
        return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None

    @property
    def master_key_path(self) -> Path:
        if self.service.master_key_file:
            return Path(self.service.master_key_file)
        return self.service.data_dir / "master.key"
