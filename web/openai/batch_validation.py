"""Validate a ``/v1`` batch and enqueue its lines, under a lease that another web process takes over if this one dies.

Two passes over the input file, one line in memory at a time:

1. every line's shape (JSON, ``custom_id`` present and unique, method, url, model, a valid chat-completion
   body), images unread. Any problem fails the batch with ``errors.data[]`` naming each line; then the quotas
   are asked whether the whole batch may be admitted, before anything is stored.
2. each line becomes a job of the vlgate batch (images decoded and stored; one that cannot be used fails its
   line alone), written a few hundred at a time; the batch is admitted under the quotas' lock, and the same
   transaction that marks its items enqueued moves it to ``in_progress``.

Until that commit nothing of the batch can run: a validator that dies leaves items no worker will take, and
whoever validates the batch next deletes them first. Nothing is doubled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from celery import Celery
from flask import Flask, g
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from common.config import Settings
from common.errors import ApiError
from common.ids import utcnow
from common.jobspec import TurnSpec
from common.models import DEFAULT_TENANT, Batch, Job, OpenAIBatch, StoredFile
from common.queue import BATCH_QUEUE
from web.auth import OPEN, Principal, gate
from web.openai.batch_lines import LineItem, LineProblem, check_line, iter_lines, line_limit, prepare_line
from web.openai.batch_protocol import BatchErrorItem
from web.openai.files import file_path
from web.quotas import charge, check_room
from web.services.batches import FLUSH_BYTES, FLUSH_ITEMS, BatchWriter
from web.services.images import store_image

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 1000  # errors.data entries kept; the last one says how many more there were


class LeaseLost(Exception):
    """This process no longer holds the batch: it was cancelled, or another process took it over."""


class Lease:
    """One process's claim on a batch while it validates it: renewed as it works, checked at every renewal."""

    def __init__(self, db: Session, batch_id: str, token: str, lease_s: float, status: str = "validating") -> None:
        self.db, self.batch_id, self.token, self.lease_s, self.status = db, batch_id, token, lease_s, status
        self.renewed = time.monotonic()

    def keep(self) -> None:
        """Renew the claim once a third of it has passed; raise LeaseLost if it is no longer ours."""
        if time.monotonic() - self.renewed < self.lease_s / 3:
            return
        moved = self.db.execute(
            update(OpenAIBatch).where(OpenAIBatch.id == self.batch_id, OpenAIBatch.lease_token == self.token,
                                      OpenAIBatch.status == self.status)
            .values(lease_expires_at=utcnow() + timedelta(seconds=self.lease_s)))
        self.db.commit()
        if moved.rowcount != 1:
            raise LeaseLost(self.batch_id)
        self.renewed = time.monotonic()

    def release(self) -> None:
        """Give the claim up (the batch was cancelled meanwhile: the keeper finishes it)."""
        self.db.rollback()
        mine = (OpenAIBatch.id == self.batch_id, OpenAIBatch.lease_token == self.token)
        self.db.execute(update(OpenAIBatch).where(*mine).values(lease_token=None, lease_expires_at=None))
        self.db.commit()


def principal_of(tenant: str, key_id: str | None) -> Principal:
    """Return the caller a batch acts for: its key (still valid: 401 codes otherwise), or the open gateway."""
    if key_id is not None:
        view = gate().by_id(key_id)
        if view is None:
            raise ApiError("invalid_api_key", "The key that created this batch was deleted.")
        return view.principal("batch")
    return OPEN if tenant == DEFAULT_TENANT else Principal(tenant=tenant, admin=False, name="batch")


@contextmanager
def acting_for(app: Flask, batch_id: str, principal: Principal) -> Iterator[None]:
    """Run as the batch's key: the quota and ownership helpers (web.auth, web.quotas) read the caller from the
    request, and a batch is validated after its request ended, so it gets a request context of its own."""
    with app.test_request_context(f"/v1/batches/{batch_id}"):
        g.principal = principal
        yield


class LineWriter(BatchWriter):
    """The batch writer, for a batch whose id exists already and whose items are multi-turn ``/v1`` requests;
    its last commit also moves the ``/v1`` batch to ``in_progress``."""

    def __init__(self, db: Session, celery: Celery, lease: Lease) -> None:
        super().__init__(db, celery, source="openai")
        self.batch_id = lease.batch_id
        self.lease = lease

    def add(self, item: LineItem) -> None:
        """Take the next line (their number was checked in the first pass)."""
        self._pending.append(item)
        self.total += 1
        self._pending_bytes += sum(len(image.data) for image in item.images)
        self.lease.keep()
        if len(self._pending) >= FLUSH_ITEMS or self._pending_bytes >= FLUSH_BYTES:
            self.flush()

    def _turns(self, item: LineItem) -> list[TurnSpec]:
        """Store a line's images (once per tenant) and return its turns, as the request gave them."""
        tenant = self.owner["tenant"]
        return [TurnSpec(role=t.role, text=t.text,
                         image_ids=[store_image(self.db, image, tenant) for image in t.images]) for t in item.turns]

    def commit(self) -> None:
        """Move the batch to in_progress in the transaction that marks its items enqueued (if still ours)."""
        self.flush()
        moved = self.db.execute(
            update(OpenAIBatch).where(OpenAIBatch.id == self.batch_id, OpenAIBatch.lease_token == self.lease.token,
                                      OpenAIBatch.status == "validating")
            .values(status="in_progress", in_progress_at=utcnow(), total=self.total, lease_token=None,
                    lease_expires_at=None))
        if moved.rowcount != 1:
            raise LeaseLost(self.batch_id)
        super().commit()


def _fail(db: Session, lease: Lease, errors: list[BatchErrorItem]) -> None:
    """End the batch as failed with its errors (if it is still ours to end)."""
    db.rollback()
    db.execute(update(OpenAIBatch).where(OpenAIBatch.id == lease.batch_id, OpenAIBatch.lease_token == lease.token,
                                         OpenAIBatch.status == "validating")
               .values(status="failed", failed_at=utcnow(), errors=[e.model_dump() for e in errors],
                       lease_token=None, lease_expires_at=None))
    db.commit()


def delete_leftovers(db: Session, batch_id: str) -> None:
    """Delete what an earlier, unfinished validation stored (never enqueued, so nothing of it ran)."""
    db.execute(delete(Job).where(Job.batch_id == batch_id))
    db.execute(delete(Batch).where(Batch.id == batch_id))
    db.commit()


def _first_pass(handle: Any, settings: Settings, lease: Lease) -> tuple[int, int, list[BatchErrorItem]]:
    """Check every line's shape; return the number of lines, their estimated tokens, and the problems found."""
    limit = line_limit(settings)
    seen: set[bytes] = set()
    count = tokens = problems = 0
    errors: list[BatchErrorItem] = []
    for number, raw in iter_lines(handle, limit):
        lease.keep()
        count += 1
        try:
            tokens += check_line(raw, settings, seen, limit).tokens
        except LineProblem as problem:
            problems += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(problem.item(number))
    if problems > len(errors):
        errors.append(BatchErrorItem(code="too_many_errors", message=f"{problems - len(errors):,} more lines have "
                                                                     "problems; fix these and try again."))
    if count > settings.batch_max_lines:
        errors.append(BatchErrorItem(code="too_many_tasks", message=f"The file has {count:,} requests; a batch "
                                                                    f"holds at most {settings.batch_max_lines:,}."))
    elif count == 0 and not errors:
        errors.append(BatchErrorItem(code="empty_file", message="The input file has no requests."))
    return count, tokens, errors


def validate(app: Flask, db: Session, row: OpenAIBatch, lease: Lease) -> None:
    """Validate a claimed batch and enqueue its lines, or fail it; stop quietly if the claim is lost."""
    settings: Settings = app.extensions["vlgate"].settings
    delete_leftovers(db, row.id)
    if row.attempts > settings.batch_max_attempts:
        _fail(db, lease, [BatchErrorItem(code="validation_failed", message=f"Validation was started {row.attempts - 1} "
                                                                           "times and never finished.")])
        return
    source = db.get(StoredFile, row.input_file_id)
    try:
        handle = open(file_path(settings, row.input_file_id), "rb") if source is not None else None  # noqa: SIM115
    except FileNotFoundError:
        handle = None
    if handle is None:
        _fail(db, lease, [BatchErrorItem(code="file_not_found", message=f"The input file {row.input_file_id} was "
                                                                        "deleted before the batch was validated.")])
        return
    try:
        principal = principal_of(row.tenant, row.key_id)
    except ApiError as exc:
        handle.close()
        _fail(db, lease, [BatchErrorItem(code=exc.code, message=exc.message)])
        return
    with handle, acting_for(app, row.id, principal):
        count, tokens, errors = _first_pass(handle, settings, lease)
        try:
            if not errors:
                charge(requests=0, tokens=tokens)
                check_room(db, BATCH_QUEUE, count)  # refused whole before anything is stored
        except ApiError as exc:
            errors = [BatchErrorItem(code=exc.code, message=exc.message)]
        if errors:
            _fail(db, lease, errors)
            return
        handle.seek(0)
        writer = LineWriter(db, app.extensions["vlgate"].celery, lease)
        try:
            for _, raw in iter_lines(handle, line_limit(settings)):
                writer.add(prepare_line(raw, settings, line_limit(settings)))
            writer.admit()  # the quotas again, exactly, under their lock: another batch may have come first
        except ApiError as exc:
            writer.abort()
            _fail(db, lease, [BatchErrorItem(code=exc.code, message=exc.message)])
            return
        except BaseException:
            writer.abort()
            raise
    writer.enqueue()
    log.info("batch %s: %d lines validated and enqueued", row.id, writer.total)
