"""Checks on loaded settings: every value that would fail later fails at start, with a
message naming its key (`ConfigError`)."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from email_validator import EmailNotValidError, validate_email

from mailbridge.settings import (
    DEFAULT_ALLOWED_TYPES,
    ImapSettings,
    RelaySettings,
    Settings,
    SmtpSettings,
)


class ConfigError(Exception):
    """A configuration problem; the message always names the key at fault."""


def _address(value: str, key: str) -> str:
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ConfigError(f"{key}: {value!r} is not a valid e-mail address ({exc})") from None


def validate(s: Settings) -> None:
    url = urlsplit(s.service.base_url)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ConfigError(
            f"[service] base_url: expected an http(s) URL, got {s.service.base_url!r}")
    try:
        ZoneInfo(s.service.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"[service] timezone: unknown time zone {s.service.timezone!r}") from None
    if s.service.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("[service] log_level: expected DEBUG, INFO, WARNING or ERROR")
    if s.service.node_id and not re.fullmatch(r"[A-Za-z0-9._:-]{1,100}", s.service.node_id):
        raise ConfigError("[service] node_id: expected up to 100 letters, digits and . _ : -")
    if s.service.stop_timeout_seconds <= 0:
        raise ConfigError("[service] stop_timeout_seconds: must be more than 0")
    if not s.database.url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError(
            f"[database] url: expected sqlite:///PATH or postgresql://..., got {s.database.url!r}")
    for key, port in (("[smtp] port", s.smtp.port), ("[web] port", s.web.port),
                      ("[outbound.smtp] port", s.outbound.smtp.port),
                      ("[policy] port", s.policy.port), ("[lmtp] port", s.lmtp.port),
                      ("[metrics] port", s.metrics.port)):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{key}: {port} is not a TCP port")
    if s.lmtp.enabled and not s.lmtp.socket and s.lmtp.port == s.smtp.port:
        raise ConfigError("[lmtp] port: must differ from [smtp] port")
    if s.policy.enabled and s.policy.port in (s.smtp.port, s.lmtp.port if s.lmtp.enabled else -1):
        raise ConfigError("[policy] port: must differ from [smtp] port and [lmtp] port")
    if s.web.session_idle_minutes <= 0 or s.web.session_absolute_hours <= 0:
        raise ConfigError("[web] session_idle_minutes / session_absolute_hours: must be more "
                          "than 0")
    if s.web.proxies < 0:
        raise ConfigError("[web] proxies: must be 0 or more")
    for name in ("threads", "connection_limit", "channel_timeout", "cleanup_interval"):
        if getattr(s.web, name) <= 0:
            raise ConfigError(f"[web] {name}: must be more than 0")
    if s.smtp.max_message_bytes < 1024:
        raise ConfigError("[smtp] max_message_bytes: must be at least 1024")
    for name in ("max_messages_per_hour_per_ip", "max_bytes_per_hour_per_ip",
                 "max_messages_per_hour_per_sender", "max_bytes_per_hour_per_sender"):
        if getattr(s.smtp, name) < 0:
            raise ConfigError(f"[smtp] {name}: must be 0 (no limit) or more")
    _address(s.addresses.sharing, "[addresses] sharing")
    if "+" in s.addresses.sharing.split("@")[0]:
        raise ConfigError("[addresses] sharing: must not contain '+' (used for plus-addressing)")
    if not s.addresses.reply_domain or "@" in s.addresses.reply_domain:
        raise ConfigError("[addresses] reply_domain: expected a domain name such as "
                          "reply.portal.example")
    if s.outbound.transport not in ("maildir", "smtp"):
        raise ConfigError(
            f"[outbound] transport: expected \"maildir\" or \"smtp\", got {s.outbound.transport!r}")
    _address(s.outbound.from_, "[outbound] from")
    if s.outbound.max_attempts < 1:
        raise ConfigError("[outbound] max_attempts: must be at least 1")
    if not 0 < s.shares.claim_hours <= 24 * 30:
        raise ConfigError("[shares] claim_hours: must be more than 0 and at most 720")
    if s.shares.remind_before_hours < 0:
        raise ConfigError("[shares] remind_before_hours: must be 0 (off) or more")
    if s.shares.max_extend_hours <= 0:
        raise ConfigError("[shares] max_extend_hours: must be more than 0")
    if not 0 < s.shares.access_request_hours <= 24 * 30:
        raise ConfigError("[shares] access_request_hours: must be more than 0 and at most 720")
    if s.retention.audit_retention_days < 0:
        raise ConfigError("[retention] audit_retention_days: must be 0 (kept for good) or more")
    for key in ("spool_days", "session_days", "code_days", "orphan_hours"):
        if getattr(s.retention, key) <= 0:
            raise ConfigError(f"[retention] {key}: must be more than 0")
    lim = s.limits
    for name in ("max_recipients", "max_parts", "max_depth", "max_file_bytes",
                 "max_total_bytes"):
        if getattr(lim, name) < 1:
            raise ConfigError(f"[limits] {name}: must be at least 1")
    unknown = set(lim.allowed_types) - set(DEFAULT_ALLOWED_TYPES)
    if unknown:
        raise ConfigError(f"[limits] allowed_types: unknown type(s) {sorted(unknown)}; "
                          f"known: {', '.join(DEFAULT_ALLOWED_TYPES)}")
    for net in s.senders.trusted_relays:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"[senders] trusted_relays: {net!r} is not an IP address or "
                              "network (e.g. \"192.0.2.10\" or \"10.0.0.0/8\")") from None
    if s.metrics.enabled and not s.metrics.host.strip():
        raise ConfigError("[metrics] host: required when [metrics] enabled = true (e.g. "
                          "\"127.0.0.1\")")
    if s.storage.backend not in ("local", "database"):
        raise ConfigError(f"[storage] backend: expected \"local\" or \"database\", got "
                          f"{s.storage.backend!r}")
    if s.worker.lease_seconds <= 0:
        raise ConfigError("[worker] lease_seconds: must be more than 0")
    if s.worker.retry_max_seconds < s.worker.retry_base_seconds:
        raise ConfigError("[worker] retry_max_seconds: must be at least retry_base_seconds")
    if not 0 <= s.worker.processes <= 256:
        raise ConfigError("[worker] processes: must be from 0 (threads inside serve) to 256")
    if not 1 <= s.worker.batch <= 100:
        raise ConfigError("[worker] batch: must be from 1 to 100")
    _validate_smtp_tls(s.smtp)
    _validate_relay_tls(s.outbound.smtp)
    _validate_imap(s.imap)


def _validate_smtp_tls(smtp: SmtpSettings) -> None:
    if bool(smtp.tls_cert_file) != bool(smtp.tls_key_file):
        missing = "tls_key_file" if smtp.tls_cert_file else "tls_cert_file"
        other = "tls_cert_file" if smtp.tls_cert_file else "tls_key_file"
        raise ConfigError(f"[smtp] {missing}: required when [smtp] {other} is set")
    if not smtp.tls_cert_file:
        for name, on in (("require_tls", smtp.require_tls),
                         ("implicit_tls_port", smtp.implicit_tls_port)):
            if on:
                raise ConfigError(f"[smtp] {name}: needs a certificate; set [smtp] "
                                  f"tls_cert_file and tls_key_file")
    if not 0 <= smtp.implicit_tls_port <= 65535:
        raise ConfigError(f"[smtp] implicit_tls_port: {smtp.implicit_tls_port} is not a TCP "
                          f"port")
    if smtp.implicit_tls_port and smtp.implicit_tls_port == smtp.port:
        raise ConfigError("[smtp] implicit_tls_port: must differ from [smtp] port")


def _validate_relay_tls(relay: RelaySettings) -> None:
    if relay.tls not in ("", "starttls", "implicit", "none"):
        raise ConfigError(f"[outbound.smtp] tls: expected \"starttls\", \"implicit\" or "
                          f"\"none\", got {relay.tls!r}")
    if relay.tls and relay.starttls is not None \
            and (relay.tls == "starttls") != relay.starttls:
        raise ConfigError(f"[outbound.smtp] starttls: deprecated, and contradicts [outbound.smtp]"
                          f" tls = {relay.tls!r}; remove it")


def _validate_imap(imap: ImapSettings) -> None:
    if imap.security not in ("tls", "starttls", "none"):
        raise ConfigError(f"[imap] security: expected \"tls\", \"starttls\" or \"none\", got "
                          f"{imap.security!r}")
    if not 0 < imap.port <= 65535:
        raise ConfigError(f"[imap] port: {imap.port} is not a TCP port")
    if imap.poll_seconds <= 0:
        raise ConfigError("[imap] poll_seconds: must be more than 0")
    if imap.batch_size < 1:
        raise ConfigError("[imap] batch_size: must be at least 1")
    folders = {"folder": imap.folder, "processed_folder": imap.processed_folder,
               "failed_folder": imap.failed_folder}
    for name, value in folders.items():
        if not value.strip("/ "):
            raise ConfigError(f"[imap] {name}: must not be empty")
    if len({v.strip("/ ").lower() for v in folders.values()}) < len(folders):
        raise ConfigError("[imap] folder / processed_folder / failed_folder: must be three "
                          "different folders")
    if imap.enabled:
        for name in ("host", "username"):
            if not getattr(imap, name).strip():
                raise ConfigError(f"[imap] {name}: required when [imap] enabled = true")
    _validate_imap_oauth(imap)


def _validate_imap_oauth(imap: ImapSettings) -> None:
    if imap.auth not in ("password", "xoauth2"):
        raise ConfigError(f"[imap] auth: expected \"password\" or \"xoauth2\", got {imap.auth!r}")
    for key in ("oauth_authority", "token_url"):
        value = getattr(imap, key)
        if value and (urlsplit(value).scheme != "https" or not urlsplit(value).hostname):
            raise ConfigError(f"[imap] {key}: expected an https:// URL, got {value!r}")
    if imap.auth != "xoauth2":
        return
    if imap.oauth_provider == "microsoft":
        if not imap.oauth_tenant.strip() and not imap.oauth_authority:
            raise ConfigError("[imap] oauth_tenant: required with oauth_provider = "
                              "\"microsoft\" (the directory (tenant) ID of the app registration)")
        if not imap.oauth_client_id.strip():
            raise ConfigError("[imap] oauth_client_id: required with oauth_provider = "
                              "\"microsoft\" (the app registration's Application (client) ID)")
    elif imap.oauth_provider == "google":
        if not imap.oauth_service_account_file and not imap.oauth_client_id.strip():
            raise ConfigError("[imap] oauth_service_account_file: required with oauth_provider ="
                              " \"google\" (a service account key with domain-wide delegation),"
                              " unless oauth_client_id and a refresh token are given")
    else:
        raise ConfigError(f"[imap] oauth_provider: expected \"microsoft\" or \"google\" with "
                          f"auth = \"xoauth2\", got {imap.oauth_provider!r}")


# --- secrets -------------------------------------------------------------------------------
