"""The chat page at ``/``: one template plus static files (no CDN, no build step)."""

from __future__ import annotations

import redis
from flask import Blueprint, Flask, Response, render_template

from web.auth import current
from web.extensions import services
from web.services.workers import model_label, ready_workers

bp = Blueprint("main", __name__)

def _current_model() -> str:
    """Return the model a ready worker serves, else the configured one (marked as not loaded).

    Only an admin sees it here (VLGATE_MODEL may be a local path); the page asks /v1/models for everyone else.
    """
    svc = services()
    if not current().admin:
        return "…"
    try:
        ready = ready_workers(svc.bus.workers())
    except redis.RedisError:
        ready = []
    return model_label(ready[0]) if ready else f"{svc.settings.model} (not loaded)"


@bp.get("/")
def index() -> Response:
    """Serve the chat page with the current model and the server's image and token limits."""
    settings = services().settings
    html = render_template(
        "index.html",
        # Shown before the page's first health poll (and without JavaScript); the demo label says so.
        model=_current_model(),
        max_image_bytes=settings.max_image_bytes,
        max_tokens_limit=settings.max_tokens_limit,
    )
    response = Response(html, mimetype="text/html")  # its security headers: web/security.py
    response.headers["Cache-Control"] = "no-cache"  # the page is tiny; always pick up a new app.js
    return response


def init_app(app: Flask) -> None:
    """Register the page."""
    app.register_blueprint(bp)
