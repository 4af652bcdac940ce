"""Batch endpoints: JSON batches, bulk multipart uploads, progress, results, cancel; logic in ``web.services``."""

from __future__ import annotations

import math
from typing import Any

from flask import Response, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from common.errors import ApiError
from common.schemas import MAX_WAIT_S, BatchPublic
from web.api import bp
from web.api.body import describe_json_type, json_value
from web.extensions import get_db, services
from web.services.batch_results import RESULT_FORMATS, batch_results, render_results
from web.services.batches import batch_public, cancel_batch, create_json_batch, parse_json_batch, wait_for_batch
from web.services.upload import UPLOAD_MAX_BYTES, create_upload_batch


def _query_wait(default: float | None) -> float | None:
    """Read ``?wait=`` (seconds, 0 to 600)."""
    raw = request.args.get("wait")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_WAIT_S:
        raise ApiError("invalid_request", f"wait: must be a number of seconds from 0 to {MAX_WAIT_S}")
    return value


def _json_items() -> dict[str, Any]:
    """Read a JSON batch body: an object with ``items``, or a bare array of items."""
    body = json_value()
    if isinstance(body, list):
        return {"items": body}
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "The body must be a JSON array of items or an object with items, "
                                          f"not {describe_json_type(body)}.")
    return body


def _upload() -> str:
    """Store a multipart bulk upload as it streams in; return the batch id."""
    request.max_content_length = UPLOAD_MAX_BYTES  # this route only; JSON bodies keep the app's limit
    boundary = request.mimetype_params.get("boundary")
    if not boundary:
        raise ApiError("invalid_request", "The multipart body has no boundary in its Content-Type.")
    try:
        stream = request.stream
    except RequestEntityTooLarge as exc:
        raise ApiError("payload_too_large", f"The upload is larger than {UPLOAD_MAX_BYTES >> 30} GiB.") from exc
    return create_upload_batch(get_db(), services(), stream, boundary.encode("latin-1"))


def _accepted(public: BatchPublic) -> Response:
    """Answer 202 with the batch and its URL in ``Location``."""
    response = jsonify(public.model_dump())
    response.status_code = 202
    response.headers["Location"] = public.links.self
    return response


def _finished_or_accepted(batch_id: str, wait_s: float | None) -> Response:
    """Answer 200 with every result if the batch finished within ``wait_s``, else 202 with its progress."""
    db = get_db()
    if wait_s is None:  # the asynchronous form: always 202, however quickly the items end
        return _accepted(batch_public(db, batch_id))
    public = wait_for_batch(db, batch_id, wait_s)
    if public.status == "running":
        return _accepted(public)
    response = jsonify(batch_results(services().session_factory, batch_id, public.status).model_dump())
    response.headers["Location"] = public.links.self
    return response


@bp.post("/batches")
def create_batch() -> Response:
    """Create a batch from JSON items or a multipart upload; answer 202 unless asked to wait."""
    if request.mimetype == "multipart/form-data":
        wait_s = _query_wait(None)  # checked before the upload is stored
        return _finished_or_accepted(_upload(), wait_s)
    if not request.is_json:
        got = request.mimetype or "no content type"
        raise ApiError("unsupported_media_type",
                       f"Send the batch as application/json or multipart/form-data (got {got}).")
    svc = services()
    query_wait = _query_wait(None)  # checked even when the body's `wait` wins: a bad parameter is an error
    batch = parse_json_batch(_json_items(), svc.settings)
    wait_s = batch.wait_s if batch.wait_s is not None else query_wait
    return _finished_or_accepted(create_json_batch(get_db(), svc, batch), wait_s)


@bp.post("/batch")
def seed_batch() -> Response:
    """Run a JSON array of items and wait for all of them (seed-compatible); 202 if time runs out."""
    svc = services()
    query_wait = _query_wait(svc.settings.chat_wait_s)  # checked even when the body's `wait` wins
    batch = parse_json_batch(_json_items(), svc.settings)
    wait_s = batch.wait_s if batch.wait_s is not None else query_wait
    return _finished_or_accepted(create_json_batch(get_db(), svc, batch), wait_s)


@bp.get("/batches/<batch_id>")
def read_batch(batch_id: str) -> Response:
    """Return a batch's progress: counts per status."""
    return jsonify(batch_public(get_db(), batch_id).model_dump())


@bp.get("/batches/<batch_id>/results")
def read_batch_results(batch_id: str) -> Response:
    """Stream a batch's results in input order as json (default), jsonl or csv."""
    fmt = request.args.get("format", "json")
    if fmt not in RESULT_FORMATS:
        raise ApiError("invalid_request", f"format: must be one of {', '.join(RESULT_FORMATS)}, not {fmt!r}")
    public = batch_public(get_db(), batch_id)
    body = render_results(services().session_factory, batch_id, public.status, fmt)
    response = Response(body, content_type=RESULT_FORMATS[fmt])
    if fmt != "json":
        response.headers["Content-Disposition"] = f'attachment; filename="{batch_id}.{fmt}"'
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.delete("/batches/<batch_id>")
def delete_batch(batch_id: str) -> Response:
    """Cancel what has not run and return the batch's progress."""
    return jsonify(cancel_batch(get_db(), services().bus, batch_id).model_dump())
