"""The `[imap]` section: defaults, overrides, errors naming the key, the password, and how a
configured folder name becomes the server's spelling."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailbridge.config import (
    ConfigError,
    load_settings,
    read_imap_oauth_secret,
    read_imap_password,
)
from mailbridge.receive.imap_session import server_folder
from tests.conftest import ROOT

ROOT_CONFIG = ROOT / "config.toml"

MINIMAL = """
[service]
base_url = "https://portal.example"
[addresses]
sharing = "share@clinic.example"
reply_domain = "reply.portal.example"
[outbound]
from = "mailbridge@portal.example"
"""

ENABLED = MINIMAL + """
[imap]
enabled = true
host = "imap.clinic-mail.example"
username = "share@clinic.example"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_shipped_config_documents_the_section_with_intake_off():
    imap = load_settings(ROOT_CONFIG, env={}).imap
    assert imap.enabled is False
    assert (imap.port, imap.security, imap.folder) == (993, "tls", "INBOX")
    assert (imap.processed_folder, imap.failed_folder) == ("mailbridge/processed",
                                                          "mailbridge/failed")
    assert imap.password_env == "MAILBRIDGE_IMAP_PASSWORD"
    assert (imap.poll_seconds, imap.batch_size) == (60, 50)


def test_environment_overrides_and_paths_relative_to_the_config_file(tmp_path):
    s = load_settings(write(tmp_path, ENABLED + 'ca_file = "certs/ca.pem"\n'),
                      env={"MAILBRIDGE_IMAP_PORT": "143", "MAILBRIDGE_IMAP_SECURITY": "starttls",
                           "MAILBRIDGE_IMAP_POLL_SECONDS": "30"})
    assert (s.imap.port, s.imap.security, s.imap.poll_seconds) == (143, "starttls", 30.0)
    assert s.imap.ca_file == str(tmp_path / "certs" / "ca.pem")


@pytest.mark.parametrize("extra,env,key", [
    ('security = "ssl"', {}, "[imap] security"),
    ("port = 0", {}, "[imap] port"),
    ("poll_seconds = 0", {}, "[imap] poll_seconds"),
    ("batch_size = 0", {}, "[imap] batch_size"),
    ('processed_folder = "INBOX"', {}, "[imap] folder / processed_folder / failed_folder"),
    ('failed_folder = "/"', {}, "[imap] failed_folder"),
    ("", {"MAILBRIDGE_IMAP_HOST": ""}, "[imap] host"),
    ("", {"MAILBRIDGE_IMAP_USERNAME": " "}, "[imap] username"),
    ("colour = 1", {}, "[imap] colour"),
])
def test_mistakes_name_the_key(tmp_path, extra, env, key):
    with pytest.raises(ConfigError) as excinfo:
        load_settings(write(tmp_path, ENABLED + extra + "\n"), env=env)
    assert str(excinfo.value).startswith(key)


def test_host_and_username_are_only_required_when_enabled(tmp_path):
    assert load_settings(write(tmp_path, MINIMAL), env={}).imap.host == ""


def test_password_from_the_named_variable_or_a_file(tmp_path):
    s = load_settings(write(tmp_path, ENABLED + 'password_env = "CLINIC_IMAP_PW"\n'), env={})
    assert read_imap_password(s, env={"CLINIC_IMAP_PW": "pw-from-env"}) == "pw-from-env"
    assert read_imap_password(s, env={}) == ""
    assert "pw-from-env" not in repr(s)

    (tmp_path / "imap.pw").write_text("pw-from-file\n")
    s = load_settings(write(tmp_path, ENABLED + 'password_file = "imap.pw"\n'), env={})
    assert read_imap_password(s, env={"MAILBRIDGE_IMAP_PASSWORD": "ignored"}) == "pw-from-file"
    (tmp_path / "imap.pw").unlink()
    with pytest.raises(ConfigError, match=r"^\[imap\] password_file"):
        read_imap_password(s, env={})


@pytest.mark.parametrize("name,delimiter,prefix,expected", [
    ("mailbridge/processed", "/", "", "mailbridge/processed"),      # Gmail, Microsoft 365
    ("mailbridge/processed", ".", "", "mailbridge.processed"),      # Dovecot (Maildir++)
    ("mailbridge/failed", ".", "INBOX.", "INBOX.mailbridge.failed"),  # Courier, old Cyrus
    ("INBOX", ".", "INBOX.", "INBOX"),
    ("inbox", "/", "", "INBOX"),
    ("INBOX/Shares", ".", "INBOX.", "INBOX.Shares"),
])
def test_folder_names_follow_the_servers_separator_and_namespace(name, delimiter, prefix,
                                                                 expected):
    assert server_folder(name, delimiter, prefix) == expected


# --- OAuth 2.0 (XOAUTH2) ------------------------------------------------------------------------

MICROSOFT = ENABLED + """auth = "xoauth2"
oauth_provider = "microsoft"
oauth_tenant = "contoso.onmicrosoft.com"
oauth_client_id = "11111111-2222-3333-4444-555555555555"
"""


def test_shipped_config_logs_in_with_a_password():
    imap = load_settings(ROOT_CONFIG, env={}).imap
    assert imap.auth == "password" and imap.oauth_provider == ""
    assert imap.oauth_client_secret_env == "MAILBRIDGE_IMAP_OAUTH_CLIENT_SECRET"


def test_oauth_files_are_relative_to_the_config_file_and_secrets_read_on_demand(tmp_path):
    s = load_settings(write(tmp_path, MICROSOFT + 'oauth_client_secret_file = "secret"\n'
                            'oauth_ca_file = "ca.pem"\n'), env={})
    assert s.imap.oauth_client_secret_file == str(tmp_path / "secret")
    assert s.imap.oauth_ca_file == str(tmp_path / "ca.pem")
    (tmp_path / "secret").write_text("s3cret\n")
    assert read_imap_oauth_secret(s, "oauth_client_secret") == "s3cret"
    assert "s3cret" not in repr(s)
    s = load_settings(write(tmp_path, MICROSOFT), env={})
    assert read_imap_oauth_secret(s, "oauth_client_secret",
                                  env={"MAILBRIDGE_IMAP_OAUTH_CLIENT_SECRET": "e"}) == "e"


@pytest.mark.parametrize("text,key", [
    (ENABLED + 'auth = "oauth"\n', "[imap] auth"),
    (ENABLED + 'auth = "xoauth2"\n', "[imap] oauth_provider"),
    (ENABLED + 'auth = "xoauth2"\noauth_provider = "yahoo"\n', "[imap] oauth_provider"),
    (MICROSOFT.replace('oauth_tenant = "contoso.onmicrosoft.com"\n', ""), "[imap] oauth_tenant"),
    (MICROSOFT.replace('oauth_client_id = "11111111-2222-3333-4444-555555555555"\n', ""),
     "[imap] oauth_client_id"),
    (MICROSOFT + 'oauth_authority = "http://login.example/tenant"\n', "[imap] oauth_authority"),
    (ENABLED + 'auth = "xoauth2"\noauth_provider = "google"\n',
     "[imap] oauth_service_account_file"),
    (ENABLED + 'auth = "xoauth2"\noauth_provider = "google"\noauth_client_id = "x"\n'
     'token_url = "oauth2.example/token"\n', "[imap] token_url"),
])
def test_oauth_mistakes_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as excinfo:
        load_settings(write(tmp_path, text), env={})
    assert str(excinfo.value).startswith(key)
