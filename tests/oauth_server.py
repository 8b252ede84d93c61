"""A local stand-in for the identity providers' token services, for the IMAP OAuth tests: an
HTTPS token service that answers MSAL (a tenant's OpenID configuration, client credentials) and
google-auth (a service account's signed JWT, a refresh token) with the providers' real error
shapes, plus a plain-HTTP token introspection endpoint (RFC 7662) for Dovecot's oauth2 passdb.

Only the internet is replaced: MSAL and google-auth run unchanged, pointed here by
`[imap] oauth_authority` / `token_url`, and Dovecot checks every token by asking this server.
"""

from __future__ import annotations

import json
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt  # PyJWT (MSAL's own dependency): checks the service account's signed assertion

from tests.tls_helpers import make_certificate

TENANT = "contoso-tenant-id"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
CLIENT_SECRET = "client-secret-value"  # noqa: S105 - a throw-away test value
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MICROSOFT_SCOPE = "https://outlook.office365.com/.default"
GOOGLE_SCOPE = "https://mail.google.com/"


@dataclass
class Issued:
    mailbox: str  # the introspection's "username": the mailbox this token may open
    active: bool = True


@dataclass
class State:
    """What the providers' consoles would hold; tests change it while the server runs."""

    tenants: set[str] = field(default_factory=lambda: {TENANT})
    clients: dict[str, str] = field(default_factory=lambda: {CLIENT_ID: CLIENT_SECRET})
    # Exchange Online: the app's FullAccess to a mailbox (an app token has no user of its own).
    mailbox_access: dict[str, str] = field(default_factory=dict)
    # Google: service account e-mail → its public key (PEM), and whether domain-wide
    # delegation was granted for the mail scope; the Workspace's users.
    service_accounts: dict[str, bytes] = field(default_factory=dict)
    delegated: set[str] = field(default_factory=set)
    workspace_users: set[str] = field(default_factory=set)
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # token → mailbox
    expires_in: int = 3600
    issued: dict[str, Issued] = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)  # every token request's form

    def revoke_all(self) -> None:
        for token in self.issued.values():
            token.active = False


class TokenService:
    """`with TokenService(tmp_path) as service:` — `service.base` (https), `service.ca_file`
    to trust, `service.introspection_url` (http) for Dovecot, `service.state` to change."""

    def __init__(self, directory: Path) -> None:
        self.state = State()
        self.certificate = make_certificate(directory, "token-service")
        self.ca_file = self.certificate.cert
        self._servers: list[ThreadingHTTPServer] = []

    def __enter__(self) -> TokenService:
        handler = _handler(self.state)
        tls = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certificate.cert, self.certificate.key)
        tls.socket = context.wrap_socket(tls.socket, server_side=True)
        plain = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        for server in (tls, plain):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        self.base = f"https://127.0.0.1:{tls.server_port}"
        self.introspection_url = f"http://127.0.0.1:{plain.server_port}/introspect"
        return self

    def __exit__(self, *exc) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    @property
    def authority(self) -> str:
        return f"{self.base}/{TENANT}"

    @property
    def google_token_url(self) -> str:
        return f"{self.base}/google/token"

    def token_requests(self, grant_type: str) -> int:
        return sum(1 for form in self.state.requests if form.get("grant_type") == grant_type)


def _handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            parts = urlsplit(self.path).path.strip("/").split("/")
            if parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
                tenant = parts[0]
                if tenant not in state.tenants:
                    self._answer(400, {"error": "invalid_tenant", "error_description":
                                       f"AADSTS90002: Tenant '{tenant}' not found.",
                                       "error_codes": [90002]})
                    return
                base = f"https://{self.headers['Host']}/{tenant}"
                self._answer(200, {"issuer": f"{base}/v2.0",
                                   "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                                   "token_endpoint": f"{base}/oauth2/v2.0/token"})
                return
            self._answer(404, {"error": "not_found"})

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("Content-Length") or 0)
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            path = urlsplit(self.path).path
            if path == "/introspect":
                issued = state.issued.get(form.get("token", ""))
                self._answer(200, {"active": True, "username": issued.mailbox}
                             if issued and issued.active else {"active": False})
                return
            state.requests.append(form)
            if path.endswith("/oauth2/v2.0/token"):
                self._microsoft(form)
            elif path == "/google/token":
                self._google(form)
            else:
                self._answer(404, {"error": "not_found"})

        def _issue(self, mailbox: str) -> None:
            token = secrets.token_urlsafe(24)
            state.issued[token] = Issued(mailbox)
            self._answer(200, {"token_type": "Bearer", "expires_in": state.expires_in,
                               "access_token": token})

        def _microsoft(self, form: dict) -> None:
            client = form.get("client_id", "")
            if client not in state.clients:
                self._answer(400, {"error": "unauthorized_client", "error_codes": [700016],
                                   "error_description": f"AADSTS700016: Application with "
                                   f"identifier '{client}' was not found in the directory."})
            elif form.get("client_secret") != state.clients[client]:
                self._answer(401, {"error": "invalid_client", "error_codes": [7000215],
                                   "error_description": "AADSTS7000215: Invalid client secret "
                                   "provided."})
            elif form.get("grant_type") != "client_credentials" \
                    or form.get("scope") != MICROSOFT_SCOPE:
                self._answer(400, {"error": "invalid_scope", "error_codes": [1002012],
                                   "error_description": "AADSTS1002012: The provided value "
                                   "for scope is not valid."})
            else:
                self._issue(state.mailbox_access.get(client, ""))

        def _google(self, form: dict) -> None:
            if form.get("grant_type") == "refresh_token":
                mailbox = state.refresh_tokens.get(form.get("refresh_token", ""))
                if mailbox is None:
                    self._answer(400, {"error": "invalid_grant",
                                       "error_description": "Token has been expired or "
                                       "revoked."})
                else:
                    self._issue(mailbox)
                return
            if form.get("grant_type") != JWT_BEARER:
                self._answer(400, {"error": "unsupported_grant_type"})
                return
            assertion = form.get("assertion", "")
            issuer = jwt.decode(assertion, options={"verify_signature": False}).get("iss", "")
            key = state.service_accounts.get(issuer)
            try:
                # google-auth addresses the assertion to Google's token endpoint wherever it
                # is sent, as Google expects.
                claims = jwt.decode(assertion, key, algorithms=["RS256"],
                                    audience="https://oauth2.googleapis.com/token")
            except (jwt.InvalidTokenError, TypeError, ValueError):
                self._answer(400, {"error": "invalid_grant", "error_description":
                                   "Invalid JWT Signature."})
                return
            if claims.get("exp", 0) < time.time():
                self._answer(400, {"error": "invalid_grant", "error_description":
                                   "Invalid JWT: Token must be a short-lived token"})
            elif issuer not in state.delegated or claims.get("scope") != GOOGLE_SCOPE:
                self._answer(401, {"error": "unauthorized_client", "error_description":
                                   "Client is unauthorized to retrieve access tokens using "
                                   "this method, or client not authorized for any of the "
                                   "scopes requested."})
            elif claims.get("sub") not in state.workspace_users:
                self._answer(400, {"error": "invalid_grant",
                                   "error_description": "Invalid email or User ID"})
            else:
                self._issue(claims["sub"])

    return Handler


def service_account_key(directory: Path, service: TokenService,
                        email: str = "mailbridge@clinic-project.iam.gserviceaccount.com"
                        ) -> Path:
    """A service account key file as Google's console downloads it (a fresh RSA key), known
    to `service`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    service.state.service_accounts[email] = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = directory / "service-account.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "clinic-project",
        "private_key_id": secrets.token_hex(20), "private_key": private,
        "client_email": email, "client_id": "109876543210987654321",
        "token_uri": "https://oauth2.googleapis.com/token"}))
    return path
