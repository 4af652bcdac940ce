"""The browser page at ``/`` (a placeholder until the streaming chat page lands)."""

from __future__ import annotations

import redis
from flask import Blueprint, Flask, Response
from markupsafe import escape

from web.extensions import services
from web.services.workers import model_label, ready_workers

bp = Blueprint("main", __name__)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vlgate</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto">
<h1>vlgate</h1>
<p>Model: <strong>{model}</strong></p>
<p>The chat page arrives with the streaming issue. Until then use the JSON API:
<a href="/api/openapi.json">/api/openapi.json</a> · <a href="/api/health">/api/health</a></p>
</body></html>
"""


def _current_model() -> str:
    """Return the model a ready worker serves, else the configured one (marked as not loaded)."""
    svc = services()
    try:
        ready = ready_workers(svc.bus.workers())
    except redis.RedisError:
        ready = []
    return model_label(ready[0]) if ready else f"{svc.settings.model} (not loaded)"


@bp.get("/")
def index() -> Response:
    """Serve the placeholder page."""
    return Response(PAGE.format(model=escape(_current_model())), mimetype="text/html")


def init_app(app: Flask) -> None:
    """Register the page."""
    app.register_blueprint(bp)
