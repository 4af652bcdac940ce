"""Submit a chat turn: validate everything, store session, message, images and job in one transaction,
then enqueue the job id."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common.config import Settings
from common.errors import ApiError
from common.ids import new_id, utcnow
from common.images import NormalizedImage, image_from_base64
from common.models import ChatSession, Job, Message, MessageImage, StoredImage
from common.queue import CHAT_QUEUE, enqueue
from common.schemas import ChatRequest
from web.extensions import Services
from web.services.workers import require_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submitted:
    """What a submission created."""

    job: Job
    session_id: str
    wait_s: float | None  # the client's ``wait``, if it gave one


def parse_chat_request(body: Any, settings: Settings) -> ChatRequest:
    """Validate a chat body against the server's limits (raises pydantic's ValidationError)."""
    context = {
        "max_tokens_limit": settings.max_tokens_limit,
        "max_prompt_chars": settings.max_prompt_chars,
        "max_images": settings.max_images_per_request,
    }
    return ChatRequest.model_validate(body, context=context)


def decode_images(request: ChatRequest, settings: Settings) -> list[NormalizedImage]:
    """Decode and normalise every image of the request (raises ImageError on the first bad one)."""
    images = []
    for value in request.all_images():
        images.append(
            image_from_base64(value, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        )
    return images


def image_id(sha256: str) -> str:
    """Return the content-derived id of a stored image."""
    return "img_" + sha256[:24]


def store_image(db: Session, image: NormalizedImage) -> str:
    """Store an image once (by sha256) and return its id; a concurrent insert of the same image is fine."""
    existing = db.execute(select(StoredImage.id).where(StoredImage.sha256 == image.sha256)).scalar_one_or_none()
    if existing is not None:
        return existing
    row = StoredImage(
        id=image_id(image.sha256),
        sha256=image.sha256,
        data=image.data,
        width=image.width,
        height=image.height,
        size_bytes=len(image.data),
        source_format=image.source_format[:16],
    )
    try:
        # A savepoint, so losing the race to another request does not abort our transaction.
        with db.begin_nested():
            db.add(row)
    except IntegrityError:
        existing = db.execute(select(StoredImage.id).where(StoredImage.sha256 == image.sha256)).scalar_one_or_none()
        if existing is None:
            raise
        return existing
    return row.id


def _session_exists(db: Session, session_id: str) -> bool:
    """Return whether a session row exists."""
    return db.execute(select(ChatSession.id).where(ChatSession.id == session_id)).first() is not None


def _store(db: Session, request: ChatRequest, images: list[NormalizedImage], settings: Settings) -> Job:
    """Add session, images, user message and job to the session's transaction and commit it."""
    now = utcnow()
    session_id = request.session_id
    if session_id is None:
        session_id = new_id("sess")
        db.add(ChatSession(id=session_id, created_at=now, updated_at=now))
    else:
        chat = db.get(ChatSession, session_id)
        if chat is None:  # deleted since we checked
            raise ApiError("session_not_found", f"Session {session_id} does not exist.")
        chat.updated_at = now
    ids_by_sha: dict[str, str] = {}
    for image in images:
        if image.sha256 not in ids_by_sha:
            ids_by_sha[image.sha256] = store_image(db, image)
    job_id = new_id("job")
    message = Message(session_id=session_id, role="user", text=request.prompt, job_id=job_id, created_at=now)
    message.image_links = [
        MessageImage(position=i, image_id=ids_by_sha[image.sha256]) for i, image in enumerate(images)
    ]
    db.add(message)
    db.flush()  # assigns the message id the job points at
    job = Job(
        id=job_id,
        session_id=session_id,
        user_message_id=message.id,
        queue=CHAT_QUEUE,
        status="queued",
        params=request.sampling(settings.default_temperature, settings.default_max_tokens),
        attempts=0,
        cancel_requested=False,
        created_at=now,
        enqueued_at=now,
    )
    db.add(job)
    db.commit()
    return job


def submit_chat(db: Session, services: Services, body: Any) -> Submitted:
    """Validate a chat turn, store it with its job, and enqueue the job; bad input stores nothing."""
    settings = services.settings
    request = parse_chat_request(body, settings)
    images = decode_images(request, settings)
    if request.session_id is not None and not _session_exists(db, request.session_id):
        raise ApiError("session_not_found", f"Session {request.session_id} does not exist.")
    require_model(services.bus, settings.model_wait_s)
    try:
        job = _store(db, request, images, settings)
    except BaseException:
        db.rollback()
        raise
    try:
        enqueue(services.celery, job.id, CHAT_QUEUE)
    except Exception as exc:  # the row is safe; the workers' reaper re-enqueues stale queued jobs
        log.warning("could not enqueue job %s (it stays queued for the reaper): %s", job.id, exc)
    return Submitted(job=job, session_id=job.session_id or "", wait_s=request.wait)
