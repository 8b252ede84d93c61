"""Reads config.toml plus MAILBRIDGE_<SECTION>_<KEY> overrides into frozen, validated settings.

Secrets (master key, relay password) are not settings: they are read on demand from the
environment or a file named by the settings, so they never appear in a repr or a log line.
"""

from __future__ import annotations

import base64
import dataclasses
import email.policy
import os
import tomllib
import typing
from pathlib import Path

from mailbridge.settings import Settings
from mailbridge.validate import ConfigError, validate

__all__ = ["MASTER_KEY_ENV", "ConfigError", "load_settings", "read_imap_oauth_secret",
           "read_imap_password", "read_master_key", "read_relay_password"]

ENV_PREFIX = "MAILBRIDGE"
MASTER_KEY_ENV = "MAILBRIDGE_MASTER_KEY"

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
    settings = _split_from(settings)
    validate(settings)
    return settings


def _split_from(s: Settings) -> Settings:
    """`[outbound] from` may carry a display name: "Document Portal <no-reply@x.example>"."""
    value = s.outbound.from_
    if "<" not in value:
        return s
    header = email.policy.default.header_factory("From", value)
    if len(header.addresses) != 1 or header.defects:
        raise ConfigError(f"[outbound] from: {value!r} is not one address, optionally with a "
                          "display name (\"Document Portal <no-reply@portal.example>\")")
    [address] = header.addresses
    if any(c in address.display_name for c in "\r\n"):
        raise ConfigError("[outbound] from: the display name must be one line")
    return dataclasses.replace(s, outbound=dataclasses.replace(
        s.outbound, from_=address.addr_spec,
        from_name=" ".join(address.display_name.split()) or s.outbound.from_name))


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
        imap=dataclasses.replace(s.imap, **_absolute_files(s.imap, (
            "ca_file", "password_file", "oauth_client_secret_file", "oauth_service_account_file",
            "oauth_refresh_token_file", "oauth_ca_file"), absolute)),
        smtp=dataclasses.replace(s.smtp, **_absolute_files(s.smtp, ("tls_cert_file",
                                                                    "tls_key_file"), absolute)),
        lmtp=dataclasses.replace(s.lmtp, **_absolute_files(s.lmtp, ("socket",), absolute)),
    )


def _absolute_files(section: typing.Any, names: tuple[str, ...],
                    absolute: typing.Callable[[Path], Path]) -> dict[str, str]:
    return {name: str(absolute(Path(value))) for name in names
            if (value := getattr(section, name))}


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


def read_imap_oauth_secret(s: Settings, name: str,
                           env: typing.Mapping[str, str] | None = None) -> str:
    """An OAuth secret of `[imap]` (`name`: "oauth_client_secret" or "oauth_refresh_token")
    from its `_file`, else the variable its `_env` names; "" if neither is set."""
    env = os.environ if env is None else env
    path = getattr(s.imap, f"{name}_file")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"[imap] {name}_file: cannot read ({exc})") from None
    return env.get(getattr(s.imap, f"{name}_env"), "")
