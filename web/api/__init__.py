"""The JSON API blueprint, mounted under ``/api``."""

from __future__ import annotations

from flask import Blueprint, Flask

bp = Blueprint("api", __name__, url_prefix="/api")

# The route modules attach their views to ``bp`` on import.
from web.api import access, batches, jobs, meta, sessions, usage  # noqa: E402, F401


def init_app(app: Flask) -> None:
    """Register the API."""
    app.register_blueprint(bp)
