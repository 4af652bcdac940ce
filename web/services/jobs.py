"""Read, wait for and cancel jobs, and render them the way clients see them."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis
from sqlalchemy.orm import Session

from common import jobs
from common.bus import TokenBus
from common.errors import ERROR_STATUS, ApiError
from common.events import FINAL_EVENTS, DoneEvent
from common.ids import is_id, isoformat
from common.models import Job
from common.schemas import FINAL_STATUSES, ChatResponse, ErrorDetail, JobAccepted, JobPublic, Links, Usage
from web.auth import visible

log = logging.getLogger(__name__)

# Re-read the row this often while waiting: a job finished without an event (cancelled while
# queued, failed by the reaper) must not keep a client waiting until its deadline.
DB_RECHECK_S = 2.0
DB_RECHECK_MAX_S = 10.0


def links(job_id: str) -> Links:
    """Return where to poll and where to stream a job."""
    return Links(self=f"/api/jobs/{job_id}", stream=f"/ws/jobs/{job_id}")


def is_final(job: Job) -> bool:
    """Return whether a job will never change again."""
    return job.status in FINAL_STATUSES


def get_job(db: Session, job_id: str) -> Job:
    """Load one of the caller's jobs fresh from the database or raise 404 ``job_not_found``."""
    job = jobs.load(db, job_id) if is_id("job", job_id) else None
    if job is None or not visible(job):  # another tenant's job does not exist for this caller
        raise ApiError("job_not_found", f"Job {job_id} does not exist.")
    return job


def usage(job: Job) -> Usage | None:
    """Return token counts when the worker recorded them."""
    return Usage.of(job.prompt_tokens, job.completion_tokens, job.cached_tokens)


def timings(job: Job) -> dict[str, float | None] | None:
    """Return the worker's numeric timings (anything else it stored is internal)."""
    if not job.timings:
        return None
    return {k: v for k, v in job.timings.items() if v is None or isinstance(v, int | float)}


def text_so_far(bus: TokenBus, job: Job) -> str | None:
    """Return the stored answer of a finished job, or the streamed text so far of a running one."""
    if is_final(job):
        return job.response
    if job.status != "running":
        return None
    try:
        return bus.snapshot(job.id)[1]
    except redis.RedisError as exc:  # the row is still worth showing without the live text
        log.warning("no snapshot for job %s: %s", job.id, exc)
        return None


def job_public(job: Job, bus: TokenBus) -> JobPublic:
    """Render a job for ``GET /api/jobs/<id>``."""
    error = ErrorDetail(code=job.error_code, message=job.error_message or job.error_code) if job.error_code else None
    return JobPublic(
        job_id=job.id,
        session_id=job.session_id,
        batch_id=job.batch_id,
        status=job.status,  # type: ignore[arg-type]
        response=text_so_far(bus, job),
        finish_reason=job.finish_reason,
        error=error,
        usage=usage(job),
        timings=timings(job),
        model=job.model,
        truncated_turns=job.truncated_turns,
        attempts=job.attempts,
        created_at=isoformat(job.created_at) or "",
        started_at=isoformat(job.started_at),
        first_token_at=isoformat(job.first_token_at),
        finished_at=isoformat(job.finished_at),
        links=links(job.id),
    )


def job_accepted(job: Job) -> JobAccepted:
    """Render the 202 answer for a job that is not finished yet."""
    return JobAccepted(job_id=job.id, session_id=job.session_id, status=job.status, links=links(job.id))  # type: ignore[arg-type]


def chat_response(job: Job) -> ChatResponse:
    """Render a finished job as the seed-compatible chat answer; a failed job is raised as its error."""
    if job.status == "failed":
        code = job.error_code or "generation_failed"
        detail = job.error_message or "generation failed"
        raise ApiError(code, f"Job {job.id} failed: {detail}", ERROR_STATUS.get(code, 500))
    return ChatResponse(
        response=job.response or "",
        session_id=job.session_id or "",
        job_id=job.id,
        status=job.status,  # type: ignore[arg-type]
        finish_reason=job.finish_reason,
        usage=usage(job),
        timings=timings(job),
        model=job.model,
        truncated_turns=job.truncated_turns,
    )


def _final_event(message: dict[str, Any] | None) -> bool:
    """Return whether a pub/sub message ends the job's stream (tokens and resets do not)."""
    if not message or message.get("type") != "message":
        return False
    try:
        event = json.loads(message["data"])
    except (TypeError, ValueError):
        return False
    return isinstance(event, dict) and event.get("type") in FINAL_EVENTS


def wait_for(db: Session, bus: TokenBus, job_id: str, wait_s: float) -> Job:
    """Return the job once it is final or ``wait_s`` has passed, whichever comes first."""
    deadline = time.monotonic() + wait_s
    recheck_s = DB_RECHECK_S
    try:
        # Subscribe before reading the row, so a "done" published in between is not missed.
        pubsub = bus.subscribe(job_id)
    except redis.RedisError as exc:
        log.warning("waiting for job %s by polling the database: %s", job_id, exc)
        pubsub = None
    try:
        job = get_job(db, job_id)
        db.commit()  # hold no database connection while waiting
        while not is_final(job):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            step = min(remaining, recheck_s)
            recheck_s = min(recheck_s * 2, DB_RECHECK_MAX_S)  # a long wait reads the row less and less often
            if pubsub is None:
                time.sleep(min(step, 0.5))
            else:
                try:
                    _wait_for_final_event(pubsub, step)
                except redis.RedisError as exc:
                    log.warning("lost the event stream of job %s: %s", job_id, exc)
                    pubsub = _close(pubsub)
            # Workers commit the row before they publish "done", so this read sees the result.
            job = get_job(db, job_id)
            db.commit()  # end the read transaction: a long wait must not sit "idle in transaction"
        return job
    finally:
        _close(pubsub)


def _wait_for_final_event(pubsub: redis.client.PubSub, timeout_s: float) -> bool:
    """Block until a final event arrives or the timeout passes; return whether one arrived."""
    end = time.monotonic() + timeout_s
    while (left := end - time.monotonic()) > 0:
        if _final_event(pubsub.get_message(timeout=left)):
            return True
    return False


def _close(pubsub: redis.client.PubSub | None) -> None:
    """Close a subscription, ignoring a Redis that is already gone."""
    if pubsub is not None:
        try:
            pubsub.close()
        except redis.RedisError:
            pass
    return None


def cancel_job(db: Session, bus: TokenBus, job_id: str) -> Job:
    """Cancel a job: a queued one never runs, a running one is told to stop at its next step."""
    status_before = get_job(db, job_id).status  # a string: the row object itself is refreshed below
    job = jobs.cancel(db, job_id)
    if job is None:
        raise ApiError("job_not_found", f"Job {job_id} does not exist.")
    if job.status == "running":
        bus.request_cancel(job_id)
    elif status_before == "queued" and job.status == "cancelled":
        announce_cancelled(bus, job.id)
    return job


def announce_cancelled(bus: TokenBus, job_id: str) -> None:
    """End the stream of a job cancelled before any worker took it (no worker will publish for it)."""
    try:
        seq = bus.snapshot(job_id)[0] + 1
        bus.publish(job_id, DoneEvent(seq=seq, response="", finish_reason="cancelled", status="cancelled").wire(), 0)
    except redis.RedisError as exc:  # followers still find the final state in the database
        log.warning("could not announce the cancellation of job %s: %s", job_id, exc)
