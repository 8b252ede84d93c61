"""Portal pages: accounts (being built)."""

from __future__ import annotations

from flask import Blueprint, Flask
from flask_limiter import Limiter

bp = Blueprint("accounts", __name__)


def register(app: Flask, limiter: Limiter) -> None:
    app.register_blueprint(bp)
