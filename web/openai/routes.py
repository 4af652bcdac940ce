"""The ``/v1`` routes (OpenAI-compatible): thin views over ``web.openai.serving``."""

from __future__ import annotations

import time

from flask import Blueprint, Flask, Response, jsonify, request, stream_with_context

from common.errors import ApiError
from common.schemas import MAX_WAIT_S
from web import audit
from web.api.body import json_object
from web.extensions import get_db, services
from web.openai import batch_routes
from web.openai.protocol import ModelCard, ModelList
from web.openai.serving import completion, model_cards, parse_request, submit_completion
from web.openai.sse import CompletionStream
from web.services.jobs import cancel_job, is_final, wait_for

bp = Blueprint("openai", __name__, url_prefix="/v1")
STARTED = int(time.time())  # a model card's ``created``: when this server started serving it


def _card() -> ModelCard:
    """Return the one model this server serves."""
    return ModelCard(created=STARTED, **model_cards(services()))


@bp.get("/models")
def list_models() -> Response:
    """List the served model, in OpenAI's list shape."""
    return jsonify(ModelList(data=[_card()]).model_dump())


@bp.get("/models/<path:model_id>")
def read_model(model_id: str) -> Response:
    """Describe the served model; any other id is a 404."""
    card = _card()
    if model_id not in (card.id, card.root):
        raise ApiError("model_not_found", f"The model `{model_id}` does not exist.", 404, param="model")
    return jsonify(card.model_dump())


@bp.post("/chat/completions")
def chat_completions() -> Response:
    """Answer a chat completion, whole or streamed as Server-Sent Events; the job id is in ``x-request-id``."""
    svc = services()
    db = get_db()
    body = parse_request(json_object(), svc.settings)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        relay = CompletionStream(svc, body.n, include_usage, request.environ.get("gunicorn.socket"))
        try:
            job = submit_completion(db, svc, body, before_enqueue=relay.follow)
        except BaseException:
            relay.close()
            raise
        response = Response(stream_with_context(iter(relay)), mimetype="text/event-stream")
        response.call_on_close(relay.close)  # also when the body is never iterated
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each chunk on at once
    else:
        job = submit_completion(db, svc, body)
        job = wait_for(db, svc.bus, job.id, MAX_WAIT_S)
        if not is_final(job):  # nobody will read a later answer: free the slot
            cancel_job(db, svc.bus, job.id)
            raise ApiError("generation_timeout", f"No answer within {MAX_WAIT_S} s; the job was cancelled.")
        audit.note_tokens(job)
        response = jsonify(completion(job, svc.settings).model_dump())
    response.headers["x-request-id"] = job.id
    return response


def init_app(app: Flask) -> None:
    """Register the OpenAI-compatible API (and its Batch API: files and batches)."""
    app.register_blueprint(bp)
    batch_routes.init_app(app)
