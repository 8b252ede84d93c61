"""`mailbridge imap check` with `[imap] auth = "xoauth2"`: what it says when the mailbox opens,
and, for each thing an operator gets wrong in the tenant or the configuration, one line naming
the key to fix (against the local token service and the real Dovecot)."""

from __future__ import annotations

import pytest

from tests.cli.test_cli import mb
from tests.helpers import MINIMAL_CONFIG
from tests.oauth_server import CLIENT_ID
from tests.receive import test_imap_oauth as poller_tests
from tests.receive.test_imap_oauth import google_env, microsoft_env

pytestmark = pytest.mark.slow

# The token service, the Dovecot with its oauth2 passdb and a fresh mailbox user: the poller
# tests' own module-scoped fixtures, not copies of them.
tokens_service = poller_tests.tokens_service
server = poller_tests.server
user = poller_tests.user

GOOGLE_ACCOUNT = "mailbridge@clinic-project.iam.gserviceaccount.com"


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL_CONFIG)
    return path


def check(cfg, env: dict[str, str]):
    return mb(cfg, "imap", "check", env=env)


def test_a_microsoft_mailbox_opens_with_a_token(cfg, server, tokens_service, user, tmp_path):
    result = check(cfg, microsoft_env(server, tokens_service, user, tmp_path))
    assert result.exit_code == 0, result.output
    assert (f"connected to 127.0.0.1:{server.port} (none, XOAUTH2 with a token from "
            f"Microsoft) as {user}") in result.output
    assert "INBOX: 0 message(s) waiting" in result.output


def test_a_google_mailbox_opens_with_a_token(cfg, server, tokens_service, user, tmp_path):
    result = check(cfg, google_env(server, tokens_service, user, tmp_path))
    assert result.exit_code == 0, result.output
    assert "XOAUTH2 with a token from Google" in result.output


def refused(result) -> str:
    assert result.exit_code == 1, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("mailbridge imap check: [imap] ")
    return line


@pytest.mark.parametrize(("change", "key", "words"), [
    ({"oauth_client_secret_file": "WRONG"},
     "[imap] oauth_client_secret_env / oauth_client_secret_file", "client secret is wrong"),
    ({"oauth_client_secret_file": "", "oauth_client_secret_env": "NO_SUCH_VARIABLE"},
     "[imap] oauth_client_secret_env / oauth_client_secret_file", "no client secret"),
    ({"oauth_client_id": "00000000-0000-0000-0000-000000000000"},
     "[imap] oauth_client_id", "no app with this client ID"),
    ({"oauth_authority": "TENANT:other-tenant"}, "[imap] oauth_tenant", "tenant"),
    ({"oauth_ca_file": ""}, "[imap] oauth_ca_file", "not trusted"),
    ({"oauth_authority": "https://127.0.0.1:1/tenant"}, "[imap] oauth_authority / oauth_tenant",
     "cannot reach the token service"),
    ({"mailbox": "someone-else@example.test"}, "[imap] username / oauth_client_id",
     "Add-MailboxPermission"),
], ids=["wrong-secret", "no-secret", "unknown-app", "unknown-tenant", "untrusted-ca",
        "unreachable", "no-mailbox-permission"])
def test_microsoft_mistakes_name_the_key(cfg, server, tokens_service, user, tmp_path, change,
                                         key, words):
    env = microsoft_env(server, tokens_service, user, tmp_path)
    change = dict(change)
    if change.get("oauth_client_secret_file") == "WRONG":
        (tmp_path / "wrong-secret").write_text("not-the-secret")
        change["oauth_client_secret_file"] = str(tmp_path / "wrong-secret")
    if change.get("oauth_authority", "").startswith("TENANT:"):
        change["oauth_authority"] = tokens_service.base + "/" + change["oauth_authority"][7:]
    if "mailbox" in change:
        tokens_service.state.mailbox_access[CLIENT_ID] = change.pop("mailbox")
    env.update({f"MAILBRIDGE_IMAP_{k.upper()}": v for k, v in change.items()})
    line = refused(check(cfg, env))
    assert line.startswith(f"mailbridge imap check: {key}: "), line
    assert words in line


@pytest.mark.parametrize(("case", "key", "words"), [
    ("no-delegation", "[imap] oauth_service_account_file", "Domain-wide delegation"),
    ("unknown-user", "[imap] username", "does not know the mailbox"),
    ("missing-key-file", "[imap] oauth_service_account_file", "cannot read"),
    ("not-a-key", "[imap] oauth_service_account_file", "not a service account key"),
    ("revoked-refresh-token", "[imap] oauth_refresh_token_env / oauth_refresh_token_file",
     "revoked or has expired"),
])
def test_google_mistakes_name_the_key(cfg, server, tokens_service, user, tmp_path, case, key,
                                      words):
    env = google_env(server, tokens_service, user, tmp_path)
    if case == "no-delegation":
        tokens_service.state.delegated.discard(GOOGLE_ACCOUNT)
    elif case == "unknown-user":
        tokens_service.state.workspace_users.discard(user)
    elif case == "missing-key-file":
        env["MAILBRIDGE_IMAP_OAUTH_SERVICE_ACCOUNT_FILE"] = str(tmp_path / "absent.json")
    elif case == "not-a-key":
        (tmp_path / "other.json").write_text('{"type": "authorized_user"}')
        env["MAILBRIDGE_IMAP_OAUTH_SERVICE_ACCOUNT_FILE"] = str(tmp_path / "other.json")
    else:
        (tmp_path / "refresh-token").write_text("revoked-token")
        env.update({"MAILBRIDGE_IMAP_OAUTH_SERVICE_ACCOUNT_FILE": "",
                    "MAILBRIDGE_IMAP_OAUTH_CLIENT_ID": "1234.apps.example",
                    "MAILBRIDGE_IMAP_OAUTH_REFRESH_TOKEN_FILE": str(tmp_path / "refresh-token")})
    line = refused(check(cfg, env))
    assert line.startswith(f"mailbridge imap check: {key}: "), line
    assert words in line
