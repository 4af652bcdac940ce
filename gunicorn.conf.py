"""gunicorn settings shared by every launch (gunicorn reads this file from the working directory)."""

from __future__ import annotations

from typing import Any


def post_worker_init(worker: Any) -> None:
    """Answer the errors gunicorn gives itself (URL too long, headers too large) in vlgate's JSON shape."""
    from web.server import use_json_errors

    use_json_errors()
