"""The recipient portal (Flask). `create_app` builds it for waitress or gunicorn."""

from __future__ import annotations

from flask import Flask

from mailbridge.runtime import Runtime


def create_app(runtime: Runtime) -> Flask:
    app = Flask(__name__, template_folder=str(_templates()))
    app.config["RUNTIME"] = runtime

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.teardown_appcontext
    def _close_db(exc):
        # waitress threads are long-lived; return the connection after each request
        if not runtime.db.is_closed():
            runtime.db.close()

    return app


def _templates():
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "templates" / "portal"
