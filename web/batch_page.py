"""The bulk page at ``/batch``: drop a folder or many images, one prompt, live progress and a results table.

The page itself is static; it talks to the batch API (``/api/batches``) from ``static/batch.js``.
"""

from __future__ import annotations

from flask import Blueprint, Flask, render_template

from web.extensions import services
from web.services.batches import MAX_ITEMS

bp = Blueprint("batch_page", __name__)

SLIDER_MAX_TOKENS = 2048  # the chat page's slider range; a server with a lower limit lowers it


@bp.get("/batch")
def batch_page() -> str:
    """Serve the batch page."""
    settings = services().settings
    limit = min(SLIDER_MAX_TOKENS, settings.max_tokens_limit)
    return render_template("batch.html", max_tokens_limit=limit, max_image_bytes=settings.max_image_bytes,
                           max_items=MAX_ITEMS, max_prompt_chars=settings.max_prompt_chars)


def init_app(app: Flask) -> None:
    """Register the page."""
    app.register_blueprint(bp)
