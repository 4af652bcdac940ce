"""Serve ``/v1/batches``: create a batch from an uploaded file, render it in OpenAI's shape, list and cancel.

A ``/v1`` batch is a vlgate batch (its items are jobs on the ``batch`` queue, shown on ``/api/batches/<id>``)
plus an ``openai_batches`` row with OpenAI's fields. Creating one only records it as ``validating``; a web
process's batch keeper (``web.openai.batch_keeper``) validates it, enqueues its lines, and finishes it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from common.config import WINDOW_UNITS, Settings
from common.errors import ApiError
from common.ids import is_id, new_id, to_epoch, utcnow
from common.models import Job, OpenAIBatch
from web.auth import owned, owner
from web.openai.batch_protocol import (
    BatchCreateRequest,
    BatchErrors,
    BatchList,
    BatchObject,
    BatchUsage,
    RequestCounts,
)
from web.openai.files import get_file
from web.openai.paging import PageQuery, page
from web.openai.serving import served_model
from web.quotas import charge

LIVE = ("in_progress", "finalizing", "cancelling")  # counts come from the items; at the end they are frozen
CANCELLABLE = ("validating", "in_progress")


def window_seconds(window: str, settings: Settings) -> int:
    """Return a completion window's length, if this server accepts it (400 naming the field otherwise)."""
    if window not in settings.batch_windows:
        allowed = ", ".join(repr(w) for w in settings.batch_windows)
        raise ApiError("invalid_request", f"completion_window: must be {allowed}", param="completion_window")
    return int(window[:-1]) * WINDOW_UNITS[window[-1]]


def create_batch(db: Session, settings: Settings, body: dict[str, Any]) -> OpenAIBatch:
    """Record a batch of the caller's ``purpose=batch`` file as ``validating``; the keeper does the rest."""
    request = BatchCreateRequest.model_validate(body)
    seconds = window_seconds(request.completion_window, settings)
    source = get_file(db, request.input_file_id, "input_file_id")
    if source.purpose != "batch":
        raise ApiError("invalid_request", f"input_file_id: {source.id} has purpose {source.purpose!r}; a batch "
                                          "reads a file uploaded with purpose 'batch'.", param="input_file_id")
    charge(requests=1, tokens=0)  # its lines' tokens when they are counted, at admission
    now = utcnow()
    row = OpenAIBatch(
        id=new_id("batch"), input_file_id=source.id, endpoint=request.endpoint,
        completion_window=request.completion_window, model=served_model(settings), status="validating",
        user_metadata=request.metadata, errors=None,
        output_expires_s=request.output_expires_after.seconds if request.output_expires_after else None,
        total=0, completed=0, failed=0, input_tokens=0, output_tokens=0, attempts=0,
        created_at=now, expires_at=now + timedelta(seconds=seconds), **owner())
    db.add(row)
    db.commit()
    return row


def get_openai_batch(db: Session, batch_id: str) -> OpenAIBatch:
    """Load one of the caller's ``/v1`` batches fresh, or raise 404 ``batch_not_found``."""
    row = None
    if is_id("batch", batch_id):
        fresh = (select(OpenAIBatch).where(OpenAIBatch.id == batch_id, owned(OpenAIBatch))
                 .execution_options(populate_existing=True))
        row = db.execute(fresh).scalar_one_or_none()
    if row is None:
        raise ApiError("batch_not_found", f"No batch found with id '{batch_id}'.", param="batch_id")
    return row


def item_totals(db: Session, batch_id: str) -> tuple[int, int, int, int]:
    """Count a batch's succeeded and failed items and sum their tokens (one aggregate query)."""
    row = db.execute(
        select(func.sum(case((Job.status == "succeeded", 1), else_=0)),
               func.sum(case((Job.status == "failed", 1), else_=0)),
               func.sum(Job.prompt_tokens), func.sum(Job.completion_tokens))
        .where(Job.batch_id == batch_id)
    ).one()
    return int(row[0] or 0), int(row[1] or 0), int(row[2] or 0), int(row[3] or 0)


def _epoch(value: Any) -> int | None:
    seconds = to_epoch(value)
    return None if seconds is None else int(seconds)


def batch_object(db: Session, row: OpenAIBatch) -> BatchObject:
    """Render a batch in OpenAI's shape (live counts while its lines run)."""
    completed, failed, prompt, output = row.completed, row.failed, row.input_tokens, row.output_tokens
    if row.status in LIVE and row.in_progress_at is not None:
        completed, failed, prompt, output = item_totals(db, row.id)
    return BatchObject(
        id=row.id, endpoint=row.endpoint, input_file_id=row.input_file_id, completion_window=row.completion_window,
        status=row.status, output_file_id=row.output_file_id, error_file_id=row.error_file_id,
        errors=BatchErrors(data=row.errors) if row.errors else None,
        created_at=_epoch(row.created_at) or 0, in_progress_at=_epoch(row.in_progress_at),
        expires_at=_epoch(row.expires_at), finalizing_at=_epoch(row.finalizing_at),
        completed_at=_epoch(row.completed_at), failed_at=_epoch(row.failed_at),
        expired_at=_epoch(row.expired_at) if row.status == "expired" else None,
        cancelling_at=_epoch(row.cancelling_at), cancelled_at=_epoch(row.cancelled_at),
        request_counts=RequestCounts(total=row.total, completed=completed, failed=failed),
        usage=BatchUsage(input_tokens=prompt, output_tokens=output, total_tokens=prompt + output),
        metadata=row.user_metadata, model=row.model,
    )


def list_batches(db: Session, query: PageQuery) -> BatchList:
    """Return one page of the caller's batches, newest first unless ``order=asc``."""
    rows, more = page(db, OpenAIBatch, query, "batch_not_found")
    data = [batch_object(db, row) for row in rows]
    return BatchList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                     has_more=more)


def cancel(db: Session, batch_id: str) -> BatchObject:
    """Cancel a batch: ``cancelling`` at once; its queued lines never run, running ones stop at their next step."""
    row = get_openai_batch(db, batch_id)
    if row.status in ("cancelling", "cancelled"):
        return batch_object(db, row)
    if row.status not in CANCELLABLE:
        raise ApiError("conflict", f"Batch {batch_id} is {row.status}; only a validating or in_progress batch can "
                                   "be cancelled.", 409)
    was = row.status  # read before the UPDATE, which also updates the loaded row
    moved = db.execute(update(OpenAIBatch).where(OpenAIBatch.id == row.id, OpenAIBatch.status == was)
                       .values(status="cancelling", cancelling_at=utcnow()))
    db.commit()
    if moved.rowcount != 1:  # it moved on meanwhile (validated, finished): answer what it is now
        return cancel(db, batch_id)
    # The keeper cancels the lines (at once: the route wakes it) and ends the stream of each one that never ran,
    # a Redis round trip per line that a 50,000-line batch should not make the client wait for; a validating
    # batch's validator sees the status and stops by itself.
    return batch_object(db, get_openai_batch(db, batch_id))
