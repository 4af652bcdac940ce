"""Submit a chat turn: validate everything, store session, message, images and job in one transaction,
then enqueue the job id."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import insert, select
from sqlalchemy.orm import Session, selectinload

from common import affinity
from common.config import Settings
from common.errors import ApiError
from common.ids import new_id, utcnow
from common.images import NormalizedImage, image_from_base64
from common.jobspec import JobSpec, SamplingSpec, StopSpec, TurnSpec
from common.models import ChatSession, Job, Message, MessageImage
from common.queue import CHAT_QUEUE, enqueue
from common.schemas import ChatRequest
from common.usage import count_submission
from web import audit
from web.auth import owned, owner
from web.extensions import Services
from web.quotas import admission, charge, estimate_tokens
from web.services.images import store_image
from web.services.workers import require_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submitted:
    """What a submission created."""

    job: Job
    session_id: str
    wait_s: float | None  # the client's ``wait``, if it gave one


def validation_context(settings: Settings) -> dict[str, Any]:
    """Return the server limits that the request schemas check (see ``common.schemas``)."""
    return {
        "max_tokens_limit": settings.max_tokens_limit,
        "max_prompt_chars": settings.max_prompt_chars,
        "max_images": settings.max_images_per_request,
    }


def parse_chat_request(body: Any, settings: Settings) -> ChatRequest:
    """Validate a chat body against the server's limits (raises pydantic's ValidationError)."""
    return ChatRequest.model_validate(body, context=validation_context(settings))


def decode_images(request: ChatRequest, settings: Settings) -> list[NormalizedImage]:
    """Decode and normalise every image of the request (raises ImageError on the first bad one)."""
    images = []
    for value in request.all_images():
        images.append(
            image_from_base64(value, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        )
    return images


def _session_exists(db: Session, session_id: str) -> bool:
    """Return whether one of the caller's sessions has this id."""
    mine = select(ChatSession.id).where(ChatSession.id == session_id, owned(ChatSession))
    return db.execute(mine).first() is not None


@dataclass
class DraftTurn:
    """A turn of a stateless request (``/v1``): role, text, and its decoded images."""

    role: str
    text: str
    images: list[NormalizedImage] = field(default_factory=list)


def _store_images(db: Session, images: list[NormalizedImage]) -> list[str]:
    """Store images once each (by content, per tenant) and return their ids in order."""
    ids_by_sha: dict[str, str] = {}
    tenant = owner()["tenant"]
    for image in images:
        if image.sha256 not in ids_by_sha:
            ids_by_sha[image.sha256] = store_image(db, image, tenant)
    return [ids_by_sha[image.sha256] for image in images]


def _history(db: Session, session_id: str) -> list[TurnSpec]:
    """Return a session's stored turns, oldest first, with their image ids."""
    messages = db.execute(
        select(Message).where(Message.session_id == session_id).order_by(Message.id)
        .options(selectinload(Message.image_links))
    ).scalars().all()
    return [TurnSpec(role=m.role, text=m.text, image_ids=m.image_ids) for m in messages]


def _new_job(job_id: str, spec: JobSpec, now: datetime, **fields: Any) -> Job:
    """Build a queued chat-queue job row carrying its spec."""
    return Job(id=job_id, queue=CHAT_QUEUE, status="queued", spec=spec.stored(), params={}, attempts=0,
               cancel_requested=False, created_at=now, enqueued_at=now, **owner(), **fields)


# Built once: plain inserts of the rows a submission only writes (the ORM's unit of work cost more than the
# database did); the job stays an ORM object, the one the caller reads back.
NEW_SESSION = insert(ChatSession.__table__)
NEW_MESSAGE = insert(Message.__table__).returning(Message.__table__.c.id)
NEW_IMAGE_LINKS = insert(MessageImage.__table__)


def _store(db: Session, request: ChatRequest, images: list[NormalizedImage], settings: Settings,
           route: Callable[[JobSpec], str | None] | None = None) -> Job:
    """Add session, images, user message and job to the session's transaction and commit it."""
    now = utcnow()
    session_id = request.session_id
    history: list[TurnSpec] = []
    if session_id is None:
        session_id = new_id("sess")
        db.execute(NEW_SESSION, {"id": session_id, "created_at": now, "updated_at": now, **owner()})
    else:
        chat = db.get(ChatSession, session_id)
        if chat is None or not _session_exists(db, session_id):  # deleted since we checked
            raise ApiError("session_not_found", f"Session {session_id} does not exist.")
        chat.updated_at = now
        history = _history(db, session_id)
    image_ids = _store_images(db, images)
    job_id = new_id("job")
    message_id = db.execute(NEW_MESSAGE, {"session_id": session_id, "role": "user", "text": request.prompt,
                                          "job_id": job_id, "created_at": now}).scalar_one()
    if image_ids:
        db.execute(NEW_IMAGE_LINKS, [{"message_id": message_id, "position": i, "image_id": image_id}
                                     for i, image_id in enumerate(image_ids)])
    sampling, stop = request.job_parts(settings.default_temperature, settings.default_max_tokens)
    spec = JobSpec(turns=[*history, TurnSpec(role="user", text=request.prompt, image_ids=image_ids)],
                   sampling=sampling, stop=stop)
    job = _new_job(job_id, spec, now, session_id=session_id, user_message_id=message_id,
                   worker_hint=route(spec) if route else None)
    db.add(job)
    count_submission(db, owner(), jobs=1, images=len(images))
    db.commit()
    audit.note(job_ids=[job_id], image_sha256s=[image.sha256 for image in images], prompt=request.prompt)
    return job


def _worker_for(services: Services, spec: JobSpec) -> str | None:
    """Return the live worker holding the cached prefix of this conversation's earlier turns, if any."""
    if len(spec.turns) < 2 or services.settings.prefix_cache_mb <= 0:
        return None
    try:
        return affinity.route(services.redis, affinity.conversation_key(owner()["tenant"], spec.turns[:-1]))
    except redis.RedisError:  # no hint: any worker answers, with a longer prefill
        return None


def _enqueue(services: Services, job: Job) -> None:
    """Send the committed job to its queue; a broker hiccup leaves it to the reaper."""
    try:
        enqueue(services.celery, job.id, job.queue, worker=job.worker_hint)
    except Exception as exc:  # the row is safe; the workers' reaper re-enqueues stale queued jobs
        log.warning("could not enqueue job %s (it stays queued for the reaper): %s", job.id, exc)


def submit_chat(db: Session, services: Services, body: Any) -> Submitted:
    """Validate a chat turn, store it with its job, and enqueue the job; bad input stores nothing."""
    settings = services.settings
    request = parse_chat_request(body, settings)
    images = decode_images(request, settings)
    if request.session_id is not None and not _session_exists(db, request.session_id):
        raise ApiError("session_not_found", f"Session {request.session_id} does not exist.")
    charge(requests=1, tokens=estimate_tokens(len(request.prompt), len(images),
                                              request.max_tokens or settings.default_max_tokens))
    require_model(services.bus, settings.model_wait_s)
    try:
        with admission(db, CHAT_QUEUE, jobs=1):
            job = _store(db, request, images, settings, lambda spec: _worker_for(services, spec))
    except BaseException:
        db.rollback()
        raise
    _enqueue(services, job)
    return Submitted(job=job, session_id=job.session_id or "", wait_s=request.wait)


def submit_turns(db: Session, services: Services, turns: list[DraftTurn], sampling: SamplingSpec,
                 stop: StopSpec, before_enqueue: Callable[[Job], None] | None = None) -> Job:
    """Store a stateless conversation (no session) as one job with its images, then enqueue it.

    ``before_enqueue`` runs between the commit and the enqueue: a streaming caller subscribes to the job's
    events there, so not even the first token can be published before it listens.
    """
    charge(requests=1, tokens=estimate_tokens(sum(len(t.text) for t in turns), sum(len(t.images) for t in turns),
                                              stop.max_tokens, sampling.n))
    require_model(services.bus, services.settings.model_wait_s)
    try:
        with admission(db, CHAT_QUEUE, jobs=1):
            specs = [TurnSpec(role=t.role, text=t.text, image_ids=_store_images(db, t.images))
                     for t in turns]
            spec = JobSpec(turns=specs, sampling=sampling, stop=stop)
            job = _new_job(new_id("job"), spec, utcnow(), worker_hint=_worker_for(services, spec))
            db.add(job)
            count_submission(db, owner(), jobs=1, images=sum(len(t.images) for t in turns))
            db.commit()
    except BaseException:
        db.rollback()
        raise
    audit.note(job_ids=[job.id], image_sha256s=[image.sha256 for t in turns for image in t.images])
    for t in turns:
        audit.note(prompt=t.text)
    if before_enqueue is not None:
        before_enqueue(job)
    _enqueue(services, job)
    return job
