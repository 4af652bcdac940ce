"""Chat and job endpoints; the logic lives in ``web.services``."""

from __future__ import annotations

from flask import Response, jsonify

from web import audit
from web.api import bp
from web.api.body import json_object
from web.extensions import get_db, services
from web.services.jobs import cancel_job, chat_response, get_job, is_final, job_accepted, job_public, wait_for
from web.services.submit import submit_chat


def _with_location(job_id: str, body: dict, status: int = 202) -> Response:
    """Answer with a body and the job's URL in ``Location``."""
    response = jsonify(body)
    response.status_code = status
    response.headers["Location"] = f"/api/jobs/{job_id}"
    return response


@bp.post("/chat")
def chat() -> Response:
    """Submit a chat turn and wait for its answer (seed-compatible)."""
    svc = services()
    db = get_db()
    submitted = submit_chat(db, svc, json_object())
    wait_s = svc.settings.chat_wait_s if submitted.wait_s is None else submitted.wait_s
    job = wait_for(db, svc.bus, submitted.job.id, wait_s)
    if is_final(job):
        audit.note_tokens(job)
        return jsonify(chat_response(job).model_dump())
    return _with_location(job.id, job_accepted(job).model_dump())


@bp.post("/jobs")
def create_job() -> Response:
    """Submit a chat turn as a job; answer 202 at once unless the client asked to wait."""
    svc = services()
    db = get_db()
    submitted = submit_chat(db, svc, json_object())
    job = submitted.job
    if submitted.wait_s:
        job = wait_for(db, svc.bus, job.id, submitted.wait_s)
        if is_final(job):
            audit.note_tokens(job)
            return _with_location(job.id, job_public(job, svc.bus).model_dump(), status=200)
    return _with_location(job.id, job_accepted(job).model_dump())


@bp.get("/jobs/<job_id>")
def read_job(job_id: str) -> Response:
    """Return a job's state; ``response`` is the text so far while it runs."""
    return jsonify(job_public(get_job(get_db(), job_id), services().bus).model_dump())


@bp.delete("/jobs/<job_id>")
def delete_job(job_id: str) -> Response:
    """Cancel a job and return its state."""
    bus = services().bus
    return jsonify(job_public(cancel_job(get_db(), bus, job_id), bus).model_dump())
