"""The configuration contract: keys, defaults, environment overrides and errors naming keys."""

from __future__ import annotations

import base64
import os

import pytest

from mailbridge.config import ConfigError, load_settings, read_master_key, read_relay_password

ROOT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "config.toml")

MINIMAL = """
[service]
base_url = "https://portal.example"
[addresses]
sharing = "share@portal.example"
reply_domain = "reply.portal.example"
[outbound]
from = "mailbridge@portal.example"
"""


def write(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_shipped_config_toml_loads_with_every_contract_key():
    s = load_settings(ROOT_CONFIG, env={})
    assert s.service.base_url and s.service.data_dir.is_absolute()
    assert s.database.url.startswith("sqlite:///")
    assert (s.smtp.host, s.smtp.port) == ("127.0.0.1", 2525)
    assert s.smtp.max_message_bytes > 25 * 1024 * 1024
    assert s.addresses.sharing == "share@portal.example"
    assert s.addresses.reply_domain == "reply.portal.example"
    assert s.outbound.transport == "maildir" and s.outbound.from_
    assert s.outbound.maildir
    relay = s.outbound.smtp
    assert (relay.host, relay.port, relay.tls_mode, relay.ca_file, relay.username,
            relay.password_env) == ("127.0.0.1", 25, "starttls", "", "",
                                    "MAILBRIDGE_RELAY_PASSWORD")
    assert (s.web.host, s.web.port) == ("127.0.0.1", 8080)
    assert (s.metrics.enabled, s.metrics.host, s.metrics.port) == (True, "127.0.0.1", 9464)
    assert s.shares.claim_hours == 24
    assert s.shares.access_request_hours == 72
    assert s.senders.require_authentication is True
    assert s.senders.trusted_authserv_ids == ()


def test_defaults_derive_paths_from_data_dir(tmp_path):
    s = load_settings(write(tmp_path, MINIMAL + '\n'), env={})
    assert s.service.data_dir == tmp_path / "var"
    assert s.database.url == f"sqlite:///{tmp_path / 'var' / 'mailbridge.db'}"
    assert s.outbound.maildir == str(tmp_path / "var" / "outbox")


def test_every_key_overridable_by_environment(tmp_path):
    env = {
        "MAILBRIDGE_SMTP_PORT": "2600",
        "MAILBRIDGE_DATABASE_URL": "postgresql://u@db.example:5432/mb",
        "MAILBRIDGE_OUTBOUND_TRANSPORT": "smtp",
        "MAILBRIDGE_OUTBOUND_FROM": "noreply@portal.example",
        "MAILBRIDGE_OUTBOUND_SMTP_HOST": "relay.example",
        "MAILBRIDGE_OUTBOUND_SMTP_STARTTLS": "true",
        "MAILBRIDGE_SHARES_CLAIM_HOURS": "0.5",
        "MAILBRIDGE_SENDERS_REQUIRE_AUTHENTICATION": "false",
        "MAILBRIDGE_SENDERS_TRUSTED_AUTHSERV_IDS": "mx1.example, mx2.example",
        "MAILBRIDGE_WEB_PORT": "9000",
    }
    s = load_settings(write(tmp_path, MINIMAL), env=env)
    assert s.smtp.port == 2600
    assert s.database.url == "postgresql://u@db.example:5432/mb"
    assert s.outbound.transport == "smtp" and s.outbound.from_ == "noreply@portal.example"
    assert s.outbound.smtp.host == "relay.example" and s.outbound.smtp.tls_mode == "starttls"
    assert s.shares.claim_hours == 0.5
    assert s.senders.require_authentication is False
    assert s.senders.trusted_authserv_ids == ("mx1.example", "mx2.example")
    assert s.web.port == 9000


def test_settings_are_frozen(tmp_path):
    s = load_settings(write(tmp_path, MINIMAL), env={})
    with pytest.raises(AttributeError):
        s.smtp.port = 1  # type: ignore[misc]


@pytest.mark.parametrize("text, env, key", [
    (MINIMAL.replace('base_url = "https://portal.example"', ""), {}, "[service] base_url"),
    (MINIMAL, {"MAILBRIDGE_SMTP_PORT": "abc"}, "[smtp] port"),
    (MINIMAL, {"MAILBRIDGE_SMTP_PORT": "70000"}, "[smtp] port"),
    (MINIMAL, {"MAILBRIDGE_OUTBOUND_TRANSPORT": "pigeon"}, "[outbound] transport"),
    (MINIMAL, {"MAILBRIDGE_ADDRESSES_SHARING": "not-an-address"}, "[addresses] sharing"),
    (MINIMAL, {"MAILBRIDGE_DATABASE_URL": "mysql://x"}, "[database] url"),
    (MINIMAL, {"MAILBRIDGE_SHARES_CLAIM_HOURS": "0"}, "[shares] claim_hours"),
    (MINIMAL, {"MAILBRIDGE_SHARES_ACCESS_REQUEST_HOURS": "0"}, "[shares] access_request_hours"),
    (MINIMAL, {"MAILBRIDGE_SHARES_ACCESS_REQUEST_HOURS": "721"},
     "[shares] access_request_hours"),
    (MINIMAL, {"MAILBRIDGE_SENDERS_REQUIRE_AUTHENTICATION": "maybe"},
     "[senders] require_authentication"),
    (MINIMAL + "\n[smtp]\nprot = 25\n", {}, "[smtp] prot"),
    (MINIMAL + "\n[smpt]\nport = 25\n", {}, "[smpt]"),
    (MINIMAL + '\n[limits]\nallowed_types = ["exe"]\n', {}, "[limits] allowed_types"),
    (MINIMAL, {"MAILBRIDGE_SERVICE_NODE_ID": "a node"}, "[service] node_id"),
    (MINIMAL, {"MAILBRIDGE_SERVICE_STOP_TIMEOUT_SECONDS": "0"}, "[service] stop_timeout_seconds"),
    (MINIMAL, {"MAILBRIDGE_WORKER_RETRY_MAX_SECONDS": "1"}, "[worker] retry_max_seconds"),
    (MINIMAL, {"MAILBRIDGE_RETENTION_ORPHAN_HOURS": "0"}, "[retention] orphan_hours"),
    (MINIMAL, {"MAILBRIDGE_METRICS_PORT": "70000"}, "[metrics] port"),
    (MINIMAL + '\n[metrics]\nhost = " "\n', {}, "[metrics] host"),
    (MINIMAL.replace('from = "mailbridge@portal.example"', ""), {}, "[outbound] from"),
    (MINIMAL.replace('"mailbridge@portal.example"', '"Portal <a@portal.example>, b@x.example"'),
     {}, "[outbound] from"),
    (MINIMAL.replace('"mailbridge@portal.example"', '"Portal <not an address>"'), {},
     "[outbound] from"),
])
def test_wrong_or_missing_key_names_the_key(tmp_path, text, env, key):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env=env)
    assert str(info.value).startswith(key)


def test_missing_file_names_the_option(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_settings(tmp_path / "nope.toml", env={})


def test_master_key_from_env_or_file_and_never_in_repr(tmp_path):
    s = load_settings(write(tmp_path, MINIMAL), env={})
    key = os.urandom(32)
    encoded = base64.b64encode(key).decode()
    assert read_master_key(s, env={"MAILBRIDGE_MASTER_KEY": encoded}) == key
    with pytest.raises(ConfigError, match="master_key_file"):
        read_master_key(s, env={})
    s.master_key_path.parent.mkdir(parents=True)
    s.master_key_path.write_text(encoded + "\n")
    assert read_master_key(s, env={}) == key
    assert encoded not in repr(s)
    with pytest.raises(ConfigError, match="MAILBRIDGE_MASTER_KEY"):
        read_master_key(s, env={"MAILBRIDGE_MASTER_KEY": "c2hvcnQ="})


def test_relay_password_from_named_env_or_file(tmp_path):
    s = load_settings(write(tmp_path, MINIMAL + '\n[outbound.smtp]\npassword_env = "RELAY_PW"\n'),
                      env={})
    assert read_relay_password(s, env={"RELAY_PW": "hunter2hunter2"}) == "hunter2hunter2"
    assert "hunter2" not in repr(s)
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    s2 = load_settings(write(tmp_path, MINIMAL + f'\n[outbound.smtp]\npassword_file = "{pw}"\n'),
                       env={})
    assert read_relay_password(s2, env={}) == "from-file"


# --- TLS and the portal's connections ---------------------------------------------------------


@pytest.mark.parametrize("env, key", [
    ({"MAILBRIDGE_SMTP_TLS_CERT_FILE": "cert.pem"}, "[smtp] tls_key_file"),
    ({"MAILBRIDGE_SMTP_TLS_KEY_FILE": "key.pem"}, "[smtp] tls_cert_file"),
    ({"MAILBRIDGE_SMTP_REQUIRE_TLS": "true"}, "[smtp] require_tls"),
    ({"MAILBRIDGE_SMTP_IMPLICIT_TLS_PORT": "465"}, "[smtp] implicit_tls_port"),
    ({"MAILBRIDGE_SMTP_TLS_CERT_FILE": "c", "MAILBRIDGE_SMTP_TLS_KEY_FILE": "k",
      "MAILBRIDGE_SMTP_IMPLICIT_TLS_PORT": "2525"}, "[smtp] implicit_tls_port"),
    ({"MAILBRIDGE_SMTP_TLS_CERT_FILE": "c", "MAILBRIDGE_SMTP_TLS_KEY_FILE": "k",
      "MAILBRIDGE_SMTP_IMPLICIT_TLS_PORT": "70000"}, "[smtp] implicit_tls_port"),
    ({"MAILBRIDGE_OUTBOUND_SMTP_TLS": "ssl"}, "[outbound.smtp] tls"),
    ({"MAILBRIDGE_OUTBOUND_SMTP_TLS": "none", "MAILBRIDGE_OUTBOUND_SMTP_STARTTLS": "true"},
     "[outbound.smtp] starttls"),
    ({"MAILBRIDGE_WEB_CONNECTION_LIMIT": "0"}, "[web] connection_limit"),
    ({"MAILBRIDGE_WEB_THREADS": "0"}, "[web] threads"),
    ({"MAILBRIDGE_WEB_CHANNEL_TIMEOUT": "-1"}, "[web] channel_timeout"),
    ({"MAILBRIDGE_WEB_CLEANUP_INTERVAL": "soon"}, "[web] cleanup_interval"),
])
def test_tls_and_connection_settings_errors_name_the_key(tmp_path, env, key):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, MINIMAL), env=env)
    assert str(info.value).startswith(key)


def test_tls_and_connection_defaults(tmp_path):
    s = load_settings(write(tmp_path, MINIMAL), env={})
    assert (s.smtp.tls_cert_file, s.smtp.tls_key_file, s.smtp.require_tls,
            s.smtp.implicit_tls_port) == ("", "", False, 0)
    assert (s.outbound.smtp.tls_mode, s.outbound.smtp.ca_file) == ("starttls", "")
    assert (s.web.threads, s.web.connection_limit, s.web.channel_timeout,
            s.web.cleanup_interval) == (8, 1000, 30.0, 10.0)


def test_certificate_and_ca_paths_are_relative_to_the_config_file(tmp_path):
    s = load_settings(write(tmp_path, MINIMAL + """
[smtp]
tls_cert_file = "tls/cert.pem"
tls_key_file = "/etc/ssl/private/key.pem"
implicit_tls_port = 465
[outbound.smtp]
tls = "implicit"
ca_file = "tls/ca.pem"
"""), env={})
    assert s.smtp.tls_cert_file == str(tmp_path / "tls" / "cert.pem")
    assert s.smtp.tls_key_file == "/etc/ssl/private/key.pem"
    assert s.outbound.smtp.ca_file == str(tmp_path / "tls" / "ca.pem")
    assert s.outbound.smtp.tls_mode == "implicit"


@pytest.mark.parametrize("starttls, mode", [("true", "starttls"), ("false", "none"),
                                            (None, "starttls")])
def test_deprecated_starttls_key_still_means_what_it_said(tmp_path, starttls, mode):
    text = MINIMAL + (f"\n[outbound.smtp]\nstarttls = {starttls}\n" if starttls else "")
    assert load_settings(write(tmp_path, text), env={}).outbound.smtp.tls_mode == mode


def test_outbound_from_may_name_the_service(tmp_path):
    """`from = "Document Portal <no-reply@…>"`: the address is ours (envelope, loop checks),
    the name is what our mail calls the service, also after a clinic's name."""
    from mailbridge.outbound import compose

    text = MINIMAL.replace('"mailbridge@portal.example"',
                           '"Document  Portal <no-reply@portal.example>"')
    s = load_settings(write(tmp_path, text), env={})
    assert (s.outbound.from_, s.outbound.from_name) == ("no-reply@portal.example",
                                                        "Document Portal")
    msg = compose.link_email(s, to="dr@x.example", link_url="https://portal.example/s/x",
                             clinic_name="Riverside PT", sender_name="Jane Doe",
                             document_count=1, deadline_text="tomorrow")
    assert msg["From"] == "Riverside PT via Document Portal <no-reply@portal.example>"
    plain = load_settings(write(tmp_path, MINIMAL), env={})
    assert (plain.outbound.from_, plain.outbound.from_name) == ("mailbridge@portal.example", "")


@pytest.mark.parametrize(("extra", "key"), [
    ("[policy]\nport = 70000\n", "[policy] port"),
    ("[lmtp]\nport = -1\n", "[lmtp] port"),
    ("[lmtp]\nenabled = true\nport = 2525\n", "[lmtp] port"),
    ("[policy]\nenabled = true\nport = 2525\n", "[policy] port"),
])
def test_mta_listener_mistakes_name_the_key(tmp_path, extra, key):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, MINIMAL + "\n" + extra), env={})
    assert str(info.value).startswith(key)


def test_an_lmtp_socket_path_is_relative_to_the_config_file(tmp_path):
    s = load_settings(write(tmp_path, MINIMAL + '\n[lmtp]\nsocket = "run/lmtp.sock"\n'), env={})
    assert s.lmtp.socket == str(tmp_path / "run" / "lmtp.sock")


@pytest.mark.parametrize(("extra", "key"), [
    ("[worker]\nprocesses = -1\n", "[worker] processes"),
    ("[worker]\nprocesses = 1000\n", "[worker] processes"),
    ("[worker]\nbatch = 0\n", "[worker] batch"),
])
def test_worker_process_mistakes_name_the_key(tmp_path, extra, key):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, MINIMAL + "\n" + extra), env={})
    assert str(info.value).startswith(key)


def test_worker_processes_default_to_the_number_of_cpus(tmp_path):
    s = load_settings(write(tmp_path, MINIMAL), env={"MAILBRIDGE_WORKER_BATCH": "2"})
    assert s.worker.processes == (os.cpu_count() or 1) and s.worker.batch == 2
    zero = load_settings(write(tmp_path, MINIMAL + "\n[worker]\nprocesses = 0\n"), env={})
    assert zero.worker.processes == 0


def test_storage_backend_is_local_unless_set_and_checked(tmp_path):
    assert load_settings(write(tmp_path, MINIMAL), env={}).storage.backend == "local"
    shared = load_settings(write(tmp_path, MINIMAL + '\n[storage]\nbackend = "database"\n'),
                           env={})
    assert shared.storage.backend == "database"
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, MINIMAL), env={"MAILBRIDGE_STORAGE_BACKEND": "s3"})
    assert str(info.value).startswith("[storage] backend")
