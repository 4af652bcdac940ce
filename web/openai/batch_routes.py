"""The ``/v1/files`` and ``/v1/batches`` routes (OpenAI's Batch API): thin views over the files and batch modules."""

from __future__ import annotations

from urllib.parse import quote

from flask import Blueprint, Flask, Response, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from common.errors import ApiError
from web.api.body import json_object
from web.extensions import get_db, services
from web.openai.batch_keeper import nudge
from web.openai.batch_protocol import FILE_PURPOSES
from web.openai.batch_serving import batch_object, cancel, create_batch, get_openai_batch, list_batches
from web.openai.file_upload import body_limit, store_upload
from web.openai.files import delete_file, file_object, get_file, iter_content, list_files, open_content
from web.openai.paging import page_query

bp = Blueprint("openai_batches", __name__, url_prefix="/v1")
MAX_FILES_PAGE = 10_000  # OpenAI's limits on ``limit``
MAX_BATCHES_PAGE = 100


@bp.post("/files")
def upload_file() -> Response:
    """Store an uploaded file (multipart: ``file``, ``purpose``), streamed to disk."""
    settings = services().settings
    if request.mimetype != "multipart/form-data":
        raise ApiError("unsupported_media_type", f"Send the file as multipart/form-data (got "
                                                 f"{request.mimetype or 'no content type'}).")
    boundary = request.mimetype_params.get("boundary")
    if not boundary:
        raise ApiError("invalid_request", "The multipart body has no boundary in its Content-Type.")
    request.max_content_length = body_limit(settings)  # this route only; JSON bodies keep the app's limit
    try:
        stream = request.stream
    except RequestEntityTooLarge as exc:
        raise ApiError("payload_too_large", f"file: larger than {settings.max_file_bytes:,} bytes, the largest "
                                            "file this server accepts.", param="file") from exc
    row = store_upload(get_db(), settings, stream, boundary.encode("latin-1"))
    return jsonify(file_object(row).model_dump())


@bp.get("/files")
def read_files() -> Response:
    """List the caller's files, newest first, a page at a time."""
    purpose = request.args.get("purpose")
    if purpose is not None and purpose not in FILE_PURPOSES:
        raise ApiError("invalid_request", f"purpose: must be one of {', '.join(FILE_PURPOSES)}", param="purpose")
    return jsonify(list_files(get_db(), page_query(10_000, MAX_FILES_PAGE), purpose).model_dump())


@bp.get("/files/<file_id>")
def read_file(file_id: str) -> Response:
    """Describe one of the caller's files."""
    return jsonify(file_object(get_file(get_db(), file_id)).model_dump())


@bp.get("/files/<file_id>/content")
def read_file_content(file_id: str) -> Response:
    """Send a file's bytes, streamed from disk."""
    row, handle = open_content(get_db(), services().settings, file_id)
    response = Response(iter_content(handle), mimetype="application/octet-stream")
    response.headers["Content-Length"] = str(row.size_bytes)
    response.headers["Content-Disposition"] = "attachment; filename*=UTF-8''" + quote(row.filename, safe="")
    return response


@bp.delete("/files/<file_id>")
def remove_file(file_id: str) -> Response:
    """Delete one of the caller's files."""
    return jsonify(delete_file(get_db(), services().settings, file_id).model_dump())


@bp.post("/batches")
def create() -> Response:
    """Create a batch from an uploaded file; it starts ``validating``."""
    db = get_db()
    row = create_batch(db, services().settings, json_object())
    nudge()
    return jsonify(batch_object(db, row).model_dump())


@bp.get("/batches")
def read_batches() -> Response:
    """List the caller's batches, newest first, a page at a time."""
    return jsonify(list_batches(get_db(), page_query(20, MAX_BATCHES_PAGE)).model_dump())


@bp.get("/batches/<batch_id>")
def read_batch(batch_id: str) -> Response:
    """Describe one of the caller's batches, with live counts while it runs."""
    db = get_db()
    return jsonify(batch_object(db, get_openai_batch(db, batch_id)).model_dump())


@bp.post("/batches/<batch_id>/cancel")
def cancel_one(batch_id: str) -> Response:
    """Cancel a batch: ``cancelling`` now, ``cancelled`` once nothing of it runs."""
    answer = cancel(get_db(), batch_id)
    nudge()
    return jsonify(answer.model_dump())


def init_app(app: Flask) -> None:
    """Register the Batch API."""
    app.register_blueprint(bp)
