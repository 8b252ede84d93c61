"""OAuth 2.0 access tokens for the watched mailbox (SASL XOAUTH2): Microsoft 365 with the
client-credentials flow (MSAL), Google Workspace with a service account acting for the mailbox
or a refresh token (google-auth). A token is kept until shortly before it expires."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path

from mailbridge.config import ConfigError, read_imap_oauth_secret
from mailbridge.receive.imap_session import ImapProblem
from mailbridge.settings import ImapSettings, Settings

# A token this close to its expiry is replaced before use: a session may take a while to log
# in, and clocks differ.
REFRESH_MARGIN_SECONDS = 300.0
TOKEN_TIMEOUT = 30.0  # seconds for one request to the token service

MICROSOFT_SCOPE = "https://outlook.office365.com/.default"
MICROSOFT_LOGIN = "https://login.microsoftonline.com"
GOOGLE_SCOPE = "https://mail.google.com/"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"  # noqa: S105 - an address

Fetch = Callable[[], tuple[str, float]]  # a new token and its lifetime in seconds

SECRET_KEY = "[imap] oauth_client_secret_env / oauth_client_secret_file"  # noqa: S105 - a key
REFRESH_KEY = "[imap] oauth_refresh_token_env / oauth_refresh_token_file"


class TokenSource:
    """Access tokens for `[imap] username`, each reused until REFRESH_MARGIN_SECONDS before it
    expires. One per poller, so reconnects reuse the token; `token(fresh=True)` after the
    server refused one (revoked or rotated before its time)."""

    def __init__(self, fetch: Fetch, clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._clock = clock
        self._token = ""
        self._expires_at = 0.0
        self.fetched = 0  # how many tokens were asked for (tests, `imap check`)

    def token(self, fresh: bool = False) -> str:
        now = self._clock()
        if fresh or not self._token or now >= self._expires_at - REFRESH_MARGIN_SECONDS:
            token, lifetime = self._fetch()
            self.fetched += 1
            self._token, self._expires_at = token, now + lifetime
        return self._token


def token_source(settings: Settings) -> TokenSource | None:
    """None for `[imap] auth = "password"`. Raises ImapProblem naming the key at fault."""
    imap = settings.imap
    if imap.auth != "xoauth2":
        return None
    if imap.oauth_provider == "microsoft":
        return TokenSource(_microsoft(settings))
    return TokenSource(_google(settings))


def _secret(settings: Settings, name: str) -> str:
    try:
        return read_imap_oauth_secret(settings, name)
    except ConfigError as exc:
        key, _, text = str(exc).partition(": ")
        raise ImapProblem(key, text) from None


def _session(imap: ImapSettings):
    import requests

    class Session(requests.Session):
        """requests has no default timeout (a token service that never answers would hold
        the poller and `imap check` for good), and lets REQUESTS_CA_BUNDLE in the environment
        override a session's own CA file unless each request names it."""

        def request(self, *args, **kwargs):
            kwargs.setdefault("timeout", TOKEN_TIMEOUT)
            kwargs.setdefault("verify", self.verify)
            return super().request(*args, **kwargs)

    session = Session()
    if imap.oauth_ca_file:
        session.verify = imap.oauth_ca_file
    return session


def _unreachable(exc: Exception, where: str, key: str, imap: ImapSettings) -> ImapProblem:
    import requests

    if isinstance(exc, requests.exceptions.SSLError):
        return ImapProblem("[imap] oauth_ca_file",
                           f"the TLS certificate of the token service {where} is not trusted; "
                           "name its CA certificate in [imap] oauth_ca_file if it is private")
    return ImapProblem(key, f"cannot reach the token service {where} "
                       f"({type(exc).__name__})")


# --- Microsoft 365 ----------------------------------------------------------------------------


def authority(imap: ImapSettings) -> str:
    return (imap.oauth_authority or f"{MICROSOFT_LOGIN}/{imap.oauth_tenant.strip()}").rstrip("/")


def _microsoft(settings: Settings) -> Fetch:
    import msal
    import requests

    imap = settings.imap
    secret = _secret(settings, "oauth_client_secret")
    if not secret:
        raise ImapProblem(SECRET_KEY, f"no client secret: set the environment variable "
                          f"{imap.oauth_client_secret_env} or name a file in [imap] "
                          "oauth_client_secret_file (Azure portal: the app registration → "
                          "Certificates & secrets)")
    where = authority(imap)
    scope = imap.oauth_scope or MICROSOFT_SCOPE
    app: list[msal.ConfidentialClientApplication] = []

    def fetch() -> tuple[str, float]:
        try:
            if not app:  # reads the tenant's OpenID configuration: network, and may fail
                app.append(msal.ConfidentialClientApplication(
                    imap.oauth_client_id, client_credential=secret, authority=where,
                    http_client=_session(imap), instance_discovery=False))
            # Our own cache decides when to renew; MSAL's would hand back a refused token.
            app[0].remove_tokens_for_client()
            result = app[0].acquire_token_for_client(scopes=[scope])
        except requests.RequestException as exc:
            raise _unreachable(exc, where, "[imap] oauth_authority / oauth_tenant", imap) from None
        except ValueError as exc:  # the tenant's configuration could not be read
            raise ImapProblem("[imap] oauth_tenant", f"{where} does not know this tenant "
                              f"({str(exc)[:200]})") from None
        if "access_token" in result:
            return result["access_token"], float(result.get("expires_in") or 3600)
        raise microsoft_refusal(result, imap)

    return fetch


# AADSTS codes that point at one setting: https://learn.microsoft.com/entra/identity-platform/
# reference-error-codes
MICROSOFT_CODES = {
    7000215: (SECRET_KEY, "the client secret is wrong (copy its Value, not its Secret ID)"),
    7000222: (SECRET_KEY, "the client secret has expired: create a new one"),
    700016: ("[imap] oauth_client_id", "no app with this client ID in the tenant"),
    90002: ("[imap] oauth_tenant", "no such tenant"),
    900023: ("[imap] oauth_tenant", "not a tenant ID or domain"),
    1002012: ("[imap] oauth_scope", "the scope is not valid; leave oauth_scope empty"),
    70011: ("[imap] oauth_scope", "the scope is not valid; leave oauth_scope empty"),
    7000112: ("[imap] oauth_client_id", "the app is disabled"),
}


def microsoft_refusal(result: dict, imap: ImapSettings) -> ImapProblem:
    description = str(result.get("error_description") or "")[:300]
    for code in result.get("error_codes") or ():
        if code in MICROSOFT_CODES:
            key, text = MICROSOFT_CODES[code]
            return ImapProblem(key, f"{text} ({description})")
    error = result.get("error", "")
    key = {"invalid_client": SECRET_KEY, "unauthorized_client": "[imap] oauth_client_id",
           "invalid_scope": "[imap] oauth_scope"}.get(error, "[imap] oauth_client_id / "
                                                             "oauth_tenant")
    return ImapProblem(key, f"Microsoft refused a token: {error or 'no token'} ({description})")


# --- Google Workspace -------------------------------------------------------------------------


def _google(settings: Settings) -> Fetch:
    import google.auth.exceptions
    from google.auth.transport.requests import Request

    imap = settings.imap
    scope = imap.oauth_scope or GOOGLE_SCOPE
    if imap.oauth_service_account_file:
        credentials, where = _service_account(imap, scope)
    else:
        from google.oauth2.credentials import Credentials

        refresh_token = _secret(settings, "oauth_refresh_token")
        if not refresh_token:
            raise ImapProblem(REFRESH_KEY, f"no refresh token: set the environment variable "
                              f"{imap.oauth_refresh_token_env} or name a file in [imap] "
                              "oauth_refresh_token_file (or use oauth_service_account_file)")
        where = imap.token_url or GOOGLE_TOKEN_URL
        credentials = Credentials(None, refresh_token=refresh_token,
                                  client_id=imap.oauth_client_id,
                                  client_secret=_secret(settings, "oauth_client_secret"),
                                  token_uri=where, scopes=[scope])
    request = Request(_session(imap))

    def fetch() -> tuple[str, float]:
        try:
            credentials.refresh(request)
        except google.auth.exceptions.RefreshError as exc:
            raise google_refusal(exc, imap) from None
        except google.auth.exceptions.TransportError as exc:
            cause = exc.__cause__ or exc.__context__ or exc
            raise _unreachable(cause if isinstance(cause, Exception) else exc, where,
                               "[imap] token_url", imap) from None
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        expiry = credentials.expiry or now + dt.timedelta(hours=1)
        return credentials.token, (expiry - now).total_seconds()

    return fetch


def _service_account(imap: ImapSettings, scope: str):
    from google.oauth2 import service_account

    key = "[imap] oauth_service_account_file"
    try:
        info = json.loads(Path(imap.oauth_service_account_file).read_text())
    except OSError as exc:
        raise ImapProblem(key, f"cannot read ({exc.strerror or exc})") from None
    except ValueError:
        raise ImapProblem(key, "not JSON: download the service account's key as JSON") from None
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise ImapProblem(key, "not a service account key (its \"type\" must be "
                          "\"service_account\")")
    if imap.token_url:
        info["token_uri"] = imap.token_url
    try:
        credentials = service_account.Credentials.from_service_account_info(
            info, scopes=[scope], subject=imap.username.strip())
    except (ValueError, KeyError) as exc:
        raise ImapProblem(key, f"the key cannot be used ({type(exc).__name__}: "
                          f"{str(exc)[:120]})") from None
    return credentials, info.get("token_uri", GOOGLE_TOKEN_URL)


def google_refusal(exc: Exception, imap: ImapSettings) -> ImapProblem:
    details = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
    error = str(details.get("error") or str(exc.args[0] if exc.args else "").split(":")[0])
    description = str(details.get("error_description") or exc)[:300]
    service_account = bool(imap.oauth_service_account_file)
    if error == "unauthorized_client" and service_account:
        return ImapProblem("[imap] oauth_service_account_file",
                           "Google refused to let the service account act for "
                           f"{imap.username}: in the Admin console (Security → Access and data "
                           "control → API controls → Domain-wide delegation) add its client ID "
                           f"with the scope {imap.oauth_scope or GOOGLE_SCOPE} ({description})")
    if error == "invalid_grant" and "email" in description.lower():
        return ImapProblem("[imap] username", f"Google does not know the mailbox "
                           f"{imap.username} in this Workspace ({description})")
    if error == "invalid_grant":
        key = "[imap] oauth_service_account_file" if service_account else REFRESH_KEY
        what = ("the service account key was refused (deleted or disabled?)" if service_account
                else "the refresh token was revoked or has expired: grant access again")
        return ImapProblem(key, f"{what} ({description})")
    if error == "invalid_client":
        key = ("[imap] oauth_service_account_file" if service_account else
               "[imap] oauth_client_id / " + SECRET_KEY.removeprefix("[imap] "))
        return ImapProblem(key, f"Google does not accept this client ({description})")
    if error == "invalid_scope":
        return ImapProblem("[imap] oauth_scope", f"the scope is not valid ({description})")
    return ImapProblem("[imap] oauth_provider", f"Google refused a token: {description}")
