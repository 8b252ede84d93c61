"""IMAP intake without a password: MSAL's client-credentials flow (Microsoft 365) and
google-auth's service account and refresh token (Google Workspace) get tokens from a local
token service; the real Dovecot checks each one with its oauth2 passdb against a local token
introspection endpoint. Tokens are reused, renewed before they expire, and a refused one is
replaced once."""

from __future__ import annotations

import secrets
import time

import pytest

from mailbridge.clock import system_clock
from mailbridge.receive import imap, imap_oauth
from mailbridge.receive.imap import ImapPoller, poll_once
from mailbridge.receive.imap_oauth import REFRESH_MARGIN_SECONDS, TokenSource
from mailbridge.receive.imap_session import ImapProblem, close
from mailbridge.runtime import build_runtime
from mailbridge.store import schema
from mailbridge.store.models import InboundMessage
from tests import dovecot
from tests.conftest import make_settings
from tests.dovecot import Dovecot
from tests.helpers import add_jane, share_message, wire
from tests.oauth_server import (
    CLIENT_ID,
    CLIENT_SECRET,
    JWT_BEARER,
    TokenService,
    service_account_key,
)

pytestmark = pytest.mark.slow

PROCESSED = "mailbridge.processed"


@pytest.fixture(scope="module")
def tokens_service(tmp_path_factory):
    with TokenService(tmp_path_factory.mktemp("token-service")) as service:
        yield service


@pytest.fixture(scope="module")
def server(tokens_service):
    dovecot.require()
    with Dovecot(spare=12, oauth2_introspection_url=tokens_service.introspection_url) as running:
        yield running


@pytest.fixture
def user(server) -> str:
    return server.fresh_user()


def microsoft_env(server, service, user, tmp_path, **extra) -> dict[str, str]:
    """`[imap]` for a Microsoft 365 mailbox, the app allowed into `user`'s mailbox."""
    service.state.mailbox_access[CLIENT_ID] = user
    secret = tmp_path / "client-secret"
    secret.write_text(CLIENT_SECRET)
    env = {"MAILBRIDGE_IMAP_ENABLED": "true", "MAILBRIDGE_IMAP_HOST": "127.0.0.1",
           "MAILBRIDGE_IMAP_PORT": str(server.port), "MAILBRIDGE_IMAP_SECURITY": "none",
           "MAILBRIDGE_IMAP_USERNAME": user, "MAILBRIDGE_IMAP_AUTH": "xoauth2",
           "MAILBRIDGE_IMAP_OAUTH_PROVIDER": "microsoft",
           "MAILBRIDGE_IMAP_OAUTH_TENANT": "contoso-tenant-id",
           "MAILBRIDGE_IMAP_OAUTH_AUTHORITY": service.authority,
           "MAILBRIDGE_IMAP_OAUTH_CLIENT_ID": CLIENT_ID,
           "MAILBRIDGE_IMAP_OAUTH_CLIENT_SECRET_FILE": str(secret),
           "MAILBRIDGE_IMAP_OAUTH_CA_FILE": str(service.ca_file)}
    env.update({f"MAILBRIDGE_IMAP_{k.upper()}": v for k, v in extra.items()})
    return env


def google_env(server, service, user, tmp_path, **extra) -> dict[str, str]:
    """`[imap]` for a Google Workspace mailbox through a delegated service account."""
    key = service_account_key(tmp_path, service)
    service.state.delegated.add("mailbridge@clinic-project.iam.gserviceaccount.com")
    service.state.workspace_users.add(user)
    env = {"MAILBRIDGE_IMAP_ENABLED": "true", "MAILBRIDGE_IMAP_HOST": "127.0.0.1",
           "MAILBRIDGE_IMAP_PORT": str(server.port), "MAILBRIDGE_IMAP_SECURITY": "none",
           "MAILBRIDGE_IMAP_USERNAME": user, "MAILBRIDGE_IMAP_AUTH": "xoauth2",
           "MAILBRIDGE_IMAP_OAUTH_PROVIDER": "google",
           "MAILBRIDGE_IMAP_OAUTH_SERVICE_ACCOUNT_FILE": str(key),
           "MAILBRIDGE_IMAP_TOKEN_URL": service.google_token_url,
           "MAILBRIDGE_IMAP_OAUTH_CA_FILE": str(service.ca_file)}
    env.update({f"MAILBRIDGE_IMAP_{k.upper()}": v for k, v in extra.items()})
    return env


@pytest.fixture
def runtime_for(tmp_path):
    opened = []

    def make(env: dict[str, str]):
        settings = make_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'mb.db'}", **env)
        runtime = build_runtime(settings, master_key=secrets.token_bytes(32))
        schema.upgrade(runtime.db, system_clock())
        opened.append(runtime)
        return runtime

    yield make
    for runtime in opened:
        runtime.db.close()


def spools_one_message(runtime, server, user) -> None:
    add_jane()
    server.append(wire(share_message()), user=user)
    stats = poll_once(runtime)
    assert stats.summary().startswith("1 new message(s) spooled")
    assert InboundMessage.select().count() == 1
    assert server.count("INBOX", user) == 0 and server.count(PROCESSED, user) == 1


# --- each flow logs in to the real Dovecot --------------------------------------------------


def test_microsoft_client_credentials_open_the_mailbox(server, tokens_service, user, tmp_path,
                                                       runtime_for):
    before = tokens_service.token_requests("client_credentials")
    runtime = runtime_for(microsoft_env(server, tokens_service, user, tmp_path))
    spools_one_message(runtime, server, user)
    assert tokens_service.token_requests("client_credentials") == before + 1
    form = tokens_service.state.requests[-1]
    assert form["client_id"] == CLIENT_ID
    assert form["scope"] == "https://outlook.office365.com/.default"
    assert f"Login: user=<{user}>, method=XOAUTH2" in server.log()


def test_google_service_account_acts_for_the_mailbox(server, tokens_service, user, tmp_path,
                                                     runtime_for):
    runtime = runtime_for(google_env(server, tokens_service, user, tmp_path))
    spools_one_message(runtime, server, user)
    form = tokens_service.state.requests[-1]
    assert form["grant_type"] == JWT_BEARER  # a signed assertion, checked with the public key


def test_google_refresh_token(server, tokens_service, user, tmp_path, runtime_for):
    refresh = secrets.token_urlsafe(16)
    tokens_service.state.refresh_tokens[refresh] = user
    (tmp_path / "refresh-token").write_text(refresh)
    env = google_env(server, tokens_service, user, tmp_path,
                     oauth_service_account_file="", oauth_client_id="1234.apps.example",
                     oauth_refresh_token_file=str(tmp_path / "refresh-token"))
    runtime = runtime_for(env)
    spools_one_message(runtime, server, user)
    assert tokens_service.state.requests[-1]["grant_type"] == "refresh_token"


# --- caching, renewal and one retry -----------------------------------------------------------


def test_a_token_is_reused_and_renewed_before_it_expires(server, tokens_service, user,
                                                         tmp_path, runtime_for):
    runtime = runtime_for(microsoft_env(server, tokens_service, user, tmp_path))
    now = [1000.0]
    source = TokenSource(imap_oauth._microsoft(runtime.settings), clock=lambda: now[0])
    for _ in range(3):  # three sessions, one token
        close(imap.login(runtime.settings, source))
    assert source.fetched == 1
    now[0] += 3600 - REFRESH_MARGIN_SECONDS - 1  # not yet within the margin
    close(imap.login(runtime.settings, source))
    assert source.fetched == 1
    now[0] += 2  # within the margin: renewed before it expires, not after a refusal
    close(imap.login(runtime.settings, source))
    assert source.fetched == 2


def test_a_revoked_token_is_replaced_once_and_the_login_succeeds(server, tokens_service, user,
                                                                 tmp_path, runtime_for):
    runtime = runtime_for(microsoft_env(server, tokens_service, user, tmp_path))
    source = imap_oauth.token_source(runtime.settings)
    close(imap.login(runtime.settings, source))
    tokens_service.state.revoke_all()  # e.g. an admin revoked the app's sessions
    close(imap.login(runtime.settings, source))
    assert source.fetched == 2


def test_a_mailbox_the_app_may_not_open_is_explained_after_one_retry(server, tokens_service,
                                                                    user, tmp_path,
                                                                    runtime_for):
    env = microsoft_env(server, tokens_service, user, tmp_path)
    tokens_service.state.mailbox_access[CLIENT_ID] = "someone-else@example.test"
    runtime = runtime_for(env)
    before = tokens_service.token_requests("client_credentials")
    with pytest.raises(ImapProblem) as refused:
        imap.check(runtime.settings)
    assert refused.value.key == "[imap] username / oauth_client_id"
    assert "FullAccess" in refused.value.text and "Add-MailboxPermission" in refused.value.text
    assert tokens_service.token_requests("client_credentials") == before + 2


def test_the_poller_gets_a_new_token_when_the_server_refuses_the_old_one(
        server, tokens_service, user, tmp_path, runtime_for):
    runtime = runtime_for(microsoft_env(server, tokens_service, user, tmp_path,
                                        poll_seconds="1"))
    add_jane()
    poller = ImapPoller(runtime, backoff_max=0.5)
    poller.start()
    try:
        assert poller.ready.wait(15)
        server.append(wire(share_message()), user=user)
        wait_for(lambda: InboundMessage.select().count() == 1)
        before = tokens_service.token_requests("client_credentials")
        tokens_service.state.revoke_all()
        server.restart()  # the session ends; the poller reconnects with its cached token
        server.append(wire(share_message(subject="second")), user=user)
        wait_for(lambda: InboundMessage.select().count() == 2, timeout=30)
        assert tokens_service.token_requests("client_credentials") == before + 1
    finally:
        assert poller.stop(10)


def wait_for(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        time.sleep(0.1)
