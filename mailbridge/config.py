"""Reads config.toml plus MAILBRIDGE_<SECTION>_<KEY> overrides into frozen, validated settings.

Secrets (master key, relay password) are not settings: they are read on demand from the
environment or a file named by the settings, so they never appear in a repr or a log line.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import os
import re
import tomllib
import typing
from pathlib import Path
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

ENV_PREFIX = "MAILBRIDGE"
MASTER_KEY_ENV = "MAILBRIDGE_MASTER_KEY"

class ConfigError(Exception):
    """A configuration problem; the message always names the key at fault."""


# --- loading -------------------------------------------------------------------------------


def _toml_name(f: dataclasses.Field) -> str:
    return f.name.rstrip("_")  # `from` is a keyword in Python


def _env_name(path: tuple[str, ...]) -> str:
    return "_".join((ENV_PREFIX, *path)).upper()


def _coerce(value: typing.Any, kind: typing.Any, key: str, source: str) -> typing.Any:
    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{key}: expected {expected}, got {value!r} ({source})")

    if kind == bool | None:  # optional only so that "not set" can be told from false
        kind = bool
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
            return True
        if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off"}:
            return False
        fail("true or false")
    if kind is int:
        if isinstance(value, bool):
            fail("a whole number")
        try:
            return int(value)
        except (TypeError, ValueError):
            fail("a whole number")
    if kind is float:
        if isinstance(value, bool):
            fail("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            fail("a number")
    if kind is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if kind is Path:
        if not isinstance(value, str):
            fail("a path")
        return Path(value)
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail("a list of strings")
        return tuple(value)
    raise AssertionError(f"unsupported setting type {kind}")


def _build(cls: type, table: dict, path: tuple[str, ...], env: typing.Mapping[str, str],
           origin: str) -> typing.Any:
    hints = typing.get_type_hints(cls)
    known = {_toml_name(f) for f in dataclasses.fields(cls)}
    for name in table:
        if name not in known:
            raise ConfigError(f"[{'.'.join(path)}] {name}: unknown key ({origin})")
    values = {}
    for f in dataclasses.fields(cls):
        name = _toml_name(f)
        key_path = (*path, name)
        key = f"[{'.'.join(path)}] {name}"
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            sub = table.get(name, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{key}: expected a table ({origin})")
            values[f.name] = _build(kind, sub, key_path, env, origin)
            continue
        env_key = _env_name(key_path)
        if env_key in env:
            values[f.name] = _coerce(env[env_key], kind, key, f"from {env_key}")
        elif name in table:
            values[f.name] = _coerce(table[name], kind, key, origin)
        elif f.metadata.get("required"):
            raise ConfigError(f"{key}: missing; set it in {origin} or {env_key}")
    return cls(**values)


def load_settings(path: str | os.PathLike | None,
                  env: typing.Mapping[str, str] | None = None) -> Settings:
    """Read `path` (may be None: environment only) and return validated settings."""
    env = os.environ if env is None else env
    table: dict = {}
    origin = "environment"
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        origin = str(p)
        try:
            with open(p, "rb") as fh:
                table = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"--config: file {p} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config: {p} is not valid TOML: {exc}") from None
        base = p.resolve().parent
    hints = typing.get_type_hints(Settings)
    known = {f.name for f in dataclasses.fields(Settings)}
    for name in table:
        if name not in known:
            raise ConfigError(f"[{name}]: unknown section ({origin})")
    sections = {}
    for f in dataclasses.fields(Settings):
        sub = table.get(f.name, {})
        if not isinstance(sub, dict):
            raise ConfigError(f"[{f.name}]: expected a table ({origin})")
        sections[f.name] = _build(hints[f.name], sub, (f.name,), env, origin)
    settings = Settings(**sections)
    settings = _resolve_paths(settings, base)
    validate(settings)
    return settings


def _resolve_paths(s: Settings, base: Path) -> Settings:
    """Relative paths are relative to the config file, so the service can start from anywhere."""

    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else (base / p)

    data_dir = absolute(s.service.data_dir)
    url = s.database.url or f"sqlite:///{data_dir / 'mailbridge.db'}"
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        rel = url[len("sqlite:///"):]
        if rel and rel != ":memory:":
            url = "sqlite:///" + str(absolute(Path(rel)))
    key_file = s.service.master_key_file
    return dataclasses.replace(
        s,
        service=dataclasses.replace(
            s.service, data_dir=data_dir,
            master_key_file=str(absolute(Path(key_file))) if key_file else ""),
        database=dataclasses.replace(s.database, url=url),
        outbound=dataclasses.replace(
            s.outbound,
            maildir=str(absolute(Path(s.outbound.maildir)) if s.outbound.maildir
                        else data_dir / "outbox"),
            smtp=dataclasses.replace(s.outbound.smtp,
                                     **_absolute_files(s.outbound.smtp, ("ca_file",), absolute))),
        imap=dataclasses.replace(s.imap, **_absolute_files(s.imap, ("ca_file", "password_file"),
                                                          absolute)),
        smtp=dataclasses.replace(s.smtp, **_absolute_files(s.smtp, ("tls_cert_file",
                                                                    "tls_key_file"), absolute)),
    )


def _absolute_files(section: typing.Any, names: tuple[str, ...],
                    absolute: typing.Callable[[Path], Path]) -> dict[str, str]:
    return {name: str(absolute(Path(value))) for name in names
            if (value := getattr(section, name))}


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
                      ("[outbound.smtp] port", s.outbound.smtp.port)):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{key}: {port} is not a TCP port")
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
    if s.worker.lease_seconds <= 0:
        raise ConfigError("[worker] lease_seconds: must be more than 0")
    if s.worker.retry_max_seconds < s.worker.retry_base_seconds:
        raise ConfigError("[worker] retry_max_seconds: must be at least retry_base_seconds")
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


# --- secrets -------------------------------------------------------------------------------


def read_master_key(s: Settings, env: typing.Mapping[str, str] | None = None) -> bytes:
    """The 32-byte master key from MAILBRIDGE_MASTER_KEY (base64) or the key file."""
    env = os.environ if env is None else env
    if env.get(MASTER_KEY_ENV):
        source, text = MASTER_KEY_ENV, env[MASTER_KEY_ENV]
    else:
        path = s.master_key_path
        source = f"[service] master_key_file ({path})"
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            raise ConfigError(f"{source}: no master key; run `mailbridge init` to create one "
                              f"or set {MASTER_KEY_ENV}") from None
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"{source}: expected 32 bytes of base64")
    return key


def read_relay_password(s: Settings, env: typing.Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    relay = s.outbound.smtp
    if relay.password_file:
        try:
            return Path(relay.password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"[outbound.smtp] password_file: cannot read ({exc})") from None
    return env.get(relay.password_env, "")


def read_imap_password(s: Settings, env: typing.Mapping[str, str] | None = None) -> str:
    """The mailbox password from [imap] password_file, else the variable named by
    [imap] password_env; "" if neither is set."""
    env = os.environ if env is None else env
    imap = s.imap
    if imap.password_file:
        try:
            return Path(imap.password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"[imap] password_file: cannot read ({exc})") from None
    return env.get(imap.password_env, "")
