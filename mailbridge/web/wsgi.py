"""WSGI entry point for running the portal alone, e.g. `gunicorn mailbridge.web.wsgi:app`
with MAILBRIDGE_CONFIG pointing at the configuration (intake runs in `mailbridge serve`)."""

from __future__ import annotations

import os

from mailbridge.config import load_settings
from mailbridge.web import create_app

os.umask(0o077)  # as `mailbridge serve`: files written here are the service user's alone
app = create_app(load_settings(os.environ.get("MAILBRIDGE_CONFIG", "config.toml")))
