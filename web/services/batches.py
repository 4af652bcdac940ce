"""Bulk batches: validate JSON items, store a batch and its item jobs, enqueue them after the last
commit; read a batch's progress, wait for it, and cancel it.

A batch item is a session-less job (``batch_id``, ``batch_index``, ``prompt``, ``image_ids``,
``item_name``) on the ``batch`` queue. An item whose image cannot be used is stored ``failed`` with
its error and never enqueued; the others run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from pydantic import ValidationError
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from common.bus import TokenBus
from common.config import Settings
from common.errors import ApiError
from common.ids import is_id, isoformat, new_id, utcnow
from common.images import ImageError, NormalizedImage, image_from_base64
from common.jobspec import JobSpec, SamplingSpec, StopSpec, TurnSpec
from common.models import Batch, Job
from common.queue import BATCH_QUEUE, enqueue
from common.schemas import BatchCounts, BatchCreate, BatchItemCreate, BatchLinks, BatchPublic
from common.usage import count_submission
from web import audit
from web.auth import owned, owner
from web.errors import validation_message
from web.extensions import Services
from web.quotas import admission, charge, check_room, estimate_tokens
from web.services.images import store_image
from web.services.jobs import announce_cancelled
from web.services.submit import validation_context
from web.services.workers import require_model

log = logging.getLogger(__name__)

MAX_ITEMS = 10_000  # per request; a larger collection is several batches
# Items are written in short transactions of at most this many items or image bytes. A transaction
# never spans a network read, so a slow upload does not hold SQLite's single writer, and this is
# all of a batch that is in memory at once (with the one image being received).
FLUSH_ITEMS = 200
FLUSH_BYTES = 4 * 1024 * 1024
MAX_REPORTED_ITEMS = 5  # invalid items named in one error message
POLL_S = 0.2


@dataclass
class PreparedItem:
    """One item ready to store: prompt, parameters, name, and its decoded images or why they failed."""

    prompt: str
    sampling: SamplingSpec
    stop: StopSpec
    name: str | None = None
    images: list[NormalizedImage] = field(default_factory=list)
    error: ImageError | None = None


class BatchWriter:
    """Store one batch's items in order as they come, in short transactions; enqueue them at the end.

    Until ``commit`` the items have no ``enqueued_at``, so the workers' reaper (which re-enqueues
    queued jobs by that time) leaves them alone, and no client knows the batch id yet: clients only
    ever see a complete batch. ``abort`` deletes what was stored; nothing was enqueued.
    """

    def __init__(self, db: Session, celery: Celery, source: str, params: dict[str, Any] | None = None) -> None:
        self.db = db
        self.celery = celery
        self.batch_id = new_id("batch")
        self.source = source
        self.params = params or {}
        self.total = 0
        self.queued_ids: list[str] = []
        self._pending: list[PreparedItem] = []
        self._pending_bytes = 0
        self._created = False
        self.images = 0  # stored with the items, for usage accounting
        self.owner = owner()  # the caller's tenant and key, taken while the request is there

    def add(self, item: PreparedItem) -> None:
        """Take the next item; write the pending ones when they reach a transaction's worth."""
        if self.total >= MAX_ITEMS:
            raise ApiError("invalid_request", f"A batch holds at most {MAX_ITEMS:,} items; split it into several.")
        self._pending.append(item)
        self.total += 1
        self._pending_bytes += sum(len(image.data) for image in item.images)
        if len(self._pending) >= FLUSH_ITEMS or self._pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the pending items (and their images, once each) in one transaction, then drop them."""
        if not self._pending:
            return
        now = utcnow()
        if not self._created:
            self.db.add(Batch(id=self.batch_id, source=self.source, total=0, params=self.params,
                              cancel_requested=False, created_at=now, **self.owner))
            self.db.flush()  # the items point at it
            self._created = True
        first = self.total - len(self._pending)
        for offset, item in enumerate(self._pending):
            self.db.add(self._job(item, first + offset, now))
        self.db.commit()
        self._pending.clear()
        self._pending_bytes = 0

    def _turns(self, item: Any) -> list[TurnSpec]:
        """Store an item's images (once per tenant) and return the turns its job runs: here one user turn."""
        image_ids = [store_image(self.db, image, self.owner["tenant"]) for image in item.images]
        audit.note(image_sha256s=[image.sha256 for image in item.images], prompt=item.prompt)
        return [TurnSpec(role="user", text=item.prompt, image_ids=image_ids)]

    def _job(self, item: Any, index: int, now: Any) -> Job:
        """Build an item's job row: queued, or failed with its image's error."""
        turns = self._turns(item)
        image_ids = [image_id for turn in turns for image_id in turn.image_ids]
        self.images += len(image_ids)
        spec = JobSpec(turns=turns, sampling=item.sampling, stop=item.stop)
        job = Job(id=new_id("job"), batch_id=self.batch_id, batch_index=index, prompt=item.prompt,
                  image_ids=image_ids, item_name=item.name, queue=BATCH_QUEUE, spec=spec.stored(), params={},
                  attempts=0, cancel_requested=False, created_at=now, **self.owner)
        if item.error is None:
            job.status = "queued"
            self.queued_ids.append(job.id)
        else:
            job.status, job.error_code, job.error_message = "failed", item.error.code, item.error.message
            job.finished_at = now
        return job

    def commit(self) -> None:
        """Write the last items, record the total, and mark the queued items enqueued (about to be)."""
        self.flush()
        self.db.execute(update(Batch).where(Batch.id == self.batch_id).values(total=self.total))
        self.db.execute(update(Job).where(Job.batch_id == self.batch_id, Job.status == "queued")
                        .values(enqueued_at=utcnow()).execution_options(synchronize_session=False))
        count_submission(self.db, self.owner, jobs=self.total, images=self.images)
        self.db.commit()
        audit.note(batch_id=self.batch_id, jobs=self.total)

    def enqueue(self) -> None:
        """Send every queued item, in order, to the batch queue (after ``commit``)."""
        for sent, job_id in enumerate(self.queued_ids):
            try:
                enqueue(self.celery, job_id, BATCH_QUEUE)
            except Exception as exc:  # the rows are safe; the workers' reaper re-enqueues stale queued jobs
                log.warning("could not enqueue %d items of batch %s (they stay queued for the reaper): %s",
                            len(self.queued_ids) - sent, self.batch_id, exc)
                return

    def admit(self) -> None:
        """Commit the batch if the caps have room for its queued items (checked under the admission lock)."""
        self.flush()  # every item is in the database before the count (they do not count until committed)
        with admission(self.db, BATCH_QUEUE, jobs=len(self.queued_ids)):
            self.commit()

    def abort(self) -> None:
        """Delete what was stored of a batch that could not be completed."""
        self.db.rollback()
        self._pending.clear()
        if not self._created:
            return
        try:
            self.db.execute(delete(Job).where(Job.batch_id == self.batch_id))
            self.db.execute(delete(Batch).where(Batch.id == self.batch_id))
            self.db.commit()
        except SQLAlchemyError as exc:
            self.db.rollback()
            log.warning("could not delete the incomplete batch %s: %s", self.batch_id, exc)


@dataclass(frozen=True)
class JsonBatch:
    """A validated JSON batch."""

    items: list[BatchItemCreate]
    wait_s: float | None


def parse_json_batch(body: dict[str, Any], settings: Settings) -> JsonBatch:
    """Validate ``{"items": [...], "wait"?}``; invalid items are one 400 naming ``items.<i>.<field>``."""
    if isinstance(body.get("items"), list) and len(body["items"]) > MAX_ITEMS:
        raise ApiError("invalid_request", f"items: {len(body['items']):,} items given; a batch holds at most "
                                          f"{MAX_ITEMS:,}, so split it into several.")
    request = BatchCreate.model_validate(body)
    context = validation_context(settings)
    limit = settings.max_images_per_request
    items: list[BatchItemCreate] = []
    problems: list[str] = []
    invalid = 0
    for index, raw in enumerate(request.items):
        try:
            item = BatchItemCreate.model_validate(raw, context=context)
        except ValidationError as exc:
            problem = validation_message(exc, prefix=f"items.{index}")
        else:
            items.append(item)
            count = len(item.all_images())
            if count <= limit:
                continue
            problem = f"items.{index}.images: {count} images given; the limit is {limit}"
        invalid += 1
        if invalid <= MAX_REPORTED_ITEMS:
            problems.append(problem)
    if problems:
        more = f"; and {invalid - len(problems)} more invalid items" if invalid > len(problems) else ""
        raise ApiError("invalid_request", "; ".join(problems) + more)
    return JsonBatch(items=items, wait_s=request.wait)


def prepare_json_item(item: BatchItemCreate, settings: Settings) -> PreparedItem:
    """Decode an item's images; a bad one fails the item alone."""
    sampling, stop = item.job_parts(settings.default_temperature, settings.default_max_tokens)
    prepared = PreparedItem(prompt=item.prompt, name=item.name, sampling=sampling, stop=stop)
    try:
        prepared.images = [
            image_from_base64(value, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
            for value in item.all_images()
        ]
    except ImageError as exc:
        prepared.error = exc
    return prepared


def create_json_batch(db: Session, services: Services, batch: JsonBatch) -> str:
    """Store a validated JSON batch and enqueue its items; return the batch id."""
    settings = services.settings
    charge(requests=1, tokens=sum(estimate_tokens(len(item.prompt), len(item.all_images()),
                                                  item.max_tokens or settings.default_max_tokens)
                                  for item in batch.items))
    require_model(services.bus, settings.model_wait_s)
    check_room(db, BATCH_QUEUE, len(batch.items))  # refused whole before anything is stored
    writer = BatchWriter(db, services.celery, source="json")
    try:
        for item in batch.items:
            writer.add(prepare_json_item(item, settings))
        writer.admit()  # checked again, exactly, with the items written: another batch may have come first
    except BaseException:
        writer.abort()
        raise
    writer.enqueue()
    return writer.batch_id


def get_batch(db: Session, batch_id: str) -> Batch:
    """Load one of the caller's batches fresh from the database or raise 404 ``batch_not_found``."""
    fresh = select(Batch).where(Batch.id == batch_id, owned(Batch)).execution_options(populate_existing=True)
    batch = db.execute(fresh).scalar_one_or_none() if is_id("batch", batch_id) else None
    if batch is None:
        raise ApiError("batch_not_found", f"Batch {batch_id} does not exist.")
    return batch


def batch_counts(db: Session, batch_id: str) -> BatchCounts:
    """Count a batch's items per status (one GROUP BY)."""
    rows = db.execute(select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)).all()
    return BatchCounts(**{status: count for status, count in rows if status in BatchCounts.model_fields})


def batch_public(db: Session, batch_id: str) -> BatchPublic:
    """Render a batch's progress: ``running`` until every item is final, then ``completed`` or ``cancelled``."""
    batch = get_batch(db, batch_id)
    counts = batch_counts(db, batch_id)
    total = batch.total or sum(counts.model_dump().values())
    final = counts.succeeded + counts.failed + counts.cancelled
    if counts.queued or counts.running:
        status = "running"
    else:
        status = "cancelled" if batch.cancel_requested else "completed"
    return BatchPublic(
        batch_id=batch.id,
        status=status,
        total=total,
        counts=counts,
        progress=round(final / total, 4) if total else 0.0,
        created_at=isoformat(batch.created_at) or "",
        links=BatchLinks(self=f"/api/batches/{batch.id}", results=f"/api/batches/{batch.id}/results"),
    )


def wait_for_batch(db: Session, batch_id: str, wait_s: float) -> BatchPublic:
    """Return the batch once every item is final or ``wait_s`` has passed (polls the counts)."""
    deadline = time.monotonic() + wait_s
    while True:
        public = batch_public(db, batch_id)
        db.commit()  # end the read transaction: a long wait must not sit "idle in transaction"
        left = deadline - time.monotonic()
        if public.status != "running" or left <= 0:
            return public
        time.sleep(min(POLL_S, left))


def cancel_batch(db: Session, bus: TokenBus, batch_id: str) -> BatchPublic:
    """Cancel what has not run: queued items never run, running ones stop at their next step."""
    get_batch(db, batch_id)
    now = utcnow()
    cancelled = db.execute(
        update(Job).where(Job.batch_id == batch_id, Job.status == "queued")
        .values(status="cancelled", finish_reason="cancelled", response="", finished_at=now, cancel_requested=True)
        .returning(Job.id).execution_options(synchronize_session=False)
    ).scalars().all()
    running = db.execute(
        update(Job).where(Job.batch_id == batch_id, Job.status == "running")
        .values(cancel_requested=True).returning(Job.id).execution_options(synchronize_session=False)
    ).scalars().all()
    if cancelled or running:  # a finished batch is left as it is
        db.execute(update(Batch).where(Batch.id == batch_id).values(cancel_requested=True))
    db.commit()
    for job_id in running:
        bus.request_cancel(job_id)
    for job_id in cancelled:
        announce_cancelled(bus, job_id)
    return batch_public(db, batch_id)
