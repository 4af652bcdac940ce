"""The web process: a Flask app factory serving the JSON API (and, later, the chat page and WebSockets).

Start it with ``gunicorn "web:create_app()"``. It never imports torch or anything from ``worker/``.
"""

from __future__ import annotations

from flask import Flask

from common.config import Settings, get_settings
from common.logs import configure_logging
from web import api, audit, auth, batch_page, errors, extensions, main, metrics, quotas, security, ws
from web.openai import routes as openai_routes

MIB = 1024 * 1024


def max_body_bytes(settings: Settings) -> int:
    """Return the largest request body: every image at the byte limit, base64-encoded, plus 1 MiB."""
    # Generous on purpose: a too-large image must reach the image check and get its own 413.
    return settings.max_image_bytes * 4 // 3 * settings.max_images_per_request + MIB


def create_app(settings: Settings | None = None) -> Flask:
    """Create the web app for these settings (default: from the environment)."""
    settings = settings or get_settings()
    configure_logging(settings)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes(settings)
    app.json.sort_keys = False  # keep the schemas' field order in answers
    extensions.init_app(app, settings)
    svc = app.extensions[extensions.EXTENSION_KEY]
    audit.init_app(app, settings)  # before auth: a refused request is audited with its latency too
    auth.init_app(app, settings, svc.session_factory, svc.redis)
    quotas.init_app(app, svc.redis, settings)
    security.init_app(app, settings)  # after auth and quotas: CORS, headers, body limits, production checks
    errors.init_app(app)
    api.init_app(app)
    main.init_app(app)
    batch_page.init_app(app)
    ws.init_app(app)
    openai_routes.init_app(app)
    metrics.init_app(app)
    return app
