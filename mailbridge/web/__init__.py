"""The recipient portal (Flask). `create_app` builds it for waitress (inside `mailbridge
serve`) or for gunicorn (`mailbridge.web.wsgi:app`)."""

from __future__ import annotations

import importlib.resources
import time

import peewee
from flask import Flask, g, redirect, render_template, request, url_for
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.middleware.proxy_fix import ProxyFix

from mailbridge.runtime import Runtime, build_runtime
from mailbridge.settings import Settings
from mailbridge.web import (
    accounts,
    documents,
    library,
    link_actions,
    link_requests,
    links,
    send_back,
    staff_auth,
    staff_clinic,
    staff_passkeys,
    staff_requests,
    staff_sent,
    staff_sent_back,
)
from mailbridge.web.access import current_account
from mailbridge.web.audit_batch import AuditBatcher
from mailbridge.web.queries import PortalQueries
from mailbridge.web.sessions import DatabaseSessionInterface

# Shipped inside the package (templates/ at the top of the repository is mailbridge.templates).
TEMPLATES = importlib.resources.files("mailbridge.templates") / "portal"

# No inline script anywhere; documents may be framed only by our own viewer page.
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "base-uri 'none'; frame-src 'self'; object-src 'self'; frame-ancestors 'none'")
# Sent only when the portal's public address is https: browsers then refuse plain http for a
# year, so a network attacker cannot strip TLS from a later visit.
HSTS = "max-age=31536000; includeSubDomains"


def create_app(settings: Settings, *, runtime: Runtime | None = None) -> Flask:
    runtime = runtime or build_runtime(settings)
    app = Flask(__name__, template_folder=str(TEMPLATES))
    app.config.update(
        RUNTIME=runtime,
        SECRET_KEY=runtime.web_key,
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the session
        WTF_CSRF_SSL_STRICT=True,
        MAX_CONTENT_LENGTH=64 * 1024,  # forms only; nothing is uploaded here
    )
    _measure_requests(app, runtime)
    if settings.web.proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.web.proxies,
                                x_proto=settings.web.proxies)
    queries = app.extensions["mailbridge_queries"] = PortalQueries()
    app.session_interface = DatabaseSessionInterface(runtime, queries)
    https = settings.service.base_url.lower().startswith("https://")
    CSRFProtect(app)
    # A shared store (redis://) counts for every process and node of this portal: the key
    # prefix is the portal's address, so other portals using the same Redis count apart. If
    # the store is unreachable, each process counts alone until it is back (limits stay on).
    shared = not settings.web.ratelimit_storage_uri.startswith("memory://")
    limiter = Limiter(get_remote_address, app=app,
                      storage_uri=settings.web.ratelimit_storage_uri, default_limits=[],
                      headers_enabled=False, key_prefix=f"mailbridge {settings.service.base_url}",
                      in_memory_fallback_enabled=shared)
    app.extensions["mailbridge_limiter"] = limiter
    app.extensions["mailbridge_audit"] = AuditBatcher(runtime.db, runtime.audit_key)
    for module in (links, link_actions, accounts, library, documents, staff_auth,
                   staff_passkeys, staff_sent, staff_clinic, link_requests, staff_requests,
                   send_back, staff_sent_back):
        module.register(app, limiter)

    @app.context_processor
    def signed_in():
        return {"account": current_account()}

    @app.get("/")
    def home():
        return redirect(url_for("library.index" if current_account() else "accounts.signin"))

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.after_request
    def security_headers(response):
        headers = response.headers
        headers.setdefault("Content-Security-Policy", CSP)
        headers.setdefault("X-Frame-Options", "DENY")
        headers["X-Content-Type-Options"] = "nosniff"
        headers["Referrer-Policy"] = "no-referrer"  # tokens are in our URLs
        headers.setdefault("Cache-Control", "no-store")
        headers["Cross-Origin-Opener-Policy"] = "same-origin"
        if https:
            headers["Strict-Transport-Security"] = HSTS
        return response

    @app.errorhandler(CSRFError)
    def csrf_error(exc):
        return render_template("error.html", title="This form has expired",
                               message="Please go back, reload the page and try again."), 400

    @app.errorhandler(404)
    def not_found(exc):
        return render_template("error.html", title="Not found",
                               message="There is nothing here."), 404

    @app.errorhandler(429)
    def too_many(exc):
        return render_template("error.html", title="Too many attempts",
                               message="Please wait a few minutes and try again."), 429

    @app.teardown_appcontext
    def close_db(exc):
        # waitress threads are long-lived; hand a PostgreSQL connection back after each
        # request. An SQLite connection stays with its thread: opening one costs its pragmas,
        # and closing the last one checkpoints the write-ahead log, several ms per request.
        if not runtime.db.is_closed() and not isinstance(runtime.db, peewee.SqliteDatabase):
            runtime.db.close()

    return app


def _measure_requests(app: Flask, runtime: Runtime) -> None:
    """Requests by route and status, and their duration, for /metrics. Registered before
    CSRF and the rate limiter so that what they refuse is timed too; the route is the Flask
    endpoint name, never the URL (link URLs carry tokens)."""

    @app.before_request
    def start_clock():
        g.metrics_started = time.perf_counter()

    @app.after_request
    def count_request(response):
        started = g.get("metrics_started")
        seconds = time.perf_counter() - started if started is not None else 0.0
        route = request.endpoint if request.endpoint in app.view_functions else "unmatched"
        runtime.metrics.request_served(route, response.status_code, seconds)
        return response
