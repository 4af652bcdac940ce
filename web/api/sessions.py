"""Conversation and image endpoints."""

from __future__ import annotations

from flask import Response, jsonify, request

from web.api import bp
from web.api.body import json_object
from web.extensions import get_db, services
from web.services.sessions import SessionFork, delete_session, fork_session, get_image, get_session


@bp.get("/sessions/<session_id>")
def read_session(session_id: str) -> Response:
    """Return a conversation's turns."""
    return jsonify(get_session(get_db(), session_id).model_dump())


@bp.post("/sessions/<session_id>/fork")
def copy_session(session_id: str) -> tuple[Response, int]:
    """Copy a conversation's first messages into a new conversation (edit and resend, regenerate)."""
    db = get_db()
    get_session(db, session_id)  # another tenant's id is 404 whatever the body says
    fork = SessionFork.model_validate(json_object()) if request.content_length else SessionFork()
    return jsonify(fork_session(db, session_id, fork).model_dump()), 201


@bp.delete("/sessions/<session_id>")
def remove_session(session_id: str) -> Response:
    """Delete a conversation, cancelling its unfinished jobs."""
    return jsonify(delete_session(get_db(), services().bus, session_id).model_dump())


@bp.get("/images/<image_id>")
def read_image(image_id: str) -> Response:
    """Return a stored image as PNG; ids are content hashes, so it may be cached forever."""
    response = Response(get_image(get_db(), image_id), mimetype="image/png")
    response.headers["Cache-Control"] = "private, max-age=31536000, immutable"
    return response
