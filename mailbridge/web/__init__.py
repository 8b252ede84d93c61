"""The recipient portal (Flask). `create_app` builds it for waitress or gunicorn."""

from __future__ import annotations

from pathlib import Path

from flask import Flask

from mailbridge.runtime import Runtime
from mailbridge.web import links

TEMPLATES = Path(__file__).resolve().parents[2] / "templates" / "portal"


def create_app(runtime: Runtime) -> Flask:
    app = Flask(__name__, template_folder=str(TEMPLATES))
    app.config["RUNTIME"] = runtime
    app.register_blueprint(links.bp)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.after_request
    def headers(response):
        response.headers["Referrer-Policy"] = "no-referrer"  # tokens are in our URLs
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'self'; frame-ancestors 'none'")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.teardown_appcontext
    def _close_db(exc):
        # waitress threads are long-lived; hand the connection back after each request
        if not runtime.db.is_closed():
            runtime.db.close()

    return app
