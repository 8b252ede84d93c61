"""Portal pages: documents (being built)."""

from __future__ import annotations

from flask import Blueprint, Flask
from flask_limiter import Limiter

bp = Blueprint("documents", __name__)


def register(app: Flask, limiter: Limiter) -> None:
    app.register_blueprint(bp)
