"""Job state transitions shared by web and workers: claim with a lease, renew, finish once, cancel, reap."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from common.affinity import AFFINITY_GRACE_S
from common.fair_share import FAIR_QUEUES, take_fairly
from common.ids import from_epoch, utcnow
from common.models import Batch, Job, Message
from common.usage import add_usage


def claim(db: Session, job_id: str, worker_id: str, lease_s: float, max_attempts: int) -> Job | None:
    """Atomically take a queued job, or a running one whose lease expired; None if someone else has it."""
    now = utcnow()
    claimable = or_(Job.status == "queued", and_(Job.status == "running", Job.lease_expires_at < now))
    result = db.execute(
        update(Job)
        .where(Job.id == job_id, claimable, Job.attempts < max_attempts, Job.cancel_requested.is_(False))
        .values(
            status="running",
            worker_id=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_s),
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, now),
        )
        .execution_options(synchronize_session=False)
    )
    db.commit()
    if result.rowcount != 1:
        return None
    return load(db, job_id)


def load(db: Session, job_id: str) -> Job | None:
    """Read a job fresh from the database (not from the session's identity map)."""
    fresh = select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    return db.execute(fresh).scalar_one_or_none()


def renew(db: Session, job_id: str, worker_id: str, lease_s: float) -> bool:
    """Extend this worker's lease; False means the job is no longer ours (cancelled or re-claimed)."""
    result = db.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == "running")
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    db.commit()
    return result.rowcount == 1


def _claimable(queue: str, max_attempts: int) -> tuple[ColumnElement[bool], ...]:
    """Return the WHERE clause of the waiting jobs of a queue that a worker may take now."""
    # enqueued_at is set when the job's request committed: an upload's items still streaming in (their batch
    # not yet complete) are not claimable.
    return (Job.queue == queue, Job.status == "queued", Job.cancel_requested.is_(False),
            Job.attempts < max_attempts, Job.enqueued_at.is_not(None))


class _Taker:
    """Claim jobs one by one until their weights fill the room."""

    def __init__(self, db: Session, worker_id: str, lease_s: float, max_attempts: int, limit: int,
                 weight: Callable[[Job], int]) -> None:
        self.db, self.worker_id, self.lease_s, self.max_attempts = db, worker_id, lease_s, max_attempts
        self.limit, self.weight = limit, weight
        self.claimed: list[Job] = []
        self.used = 0

    def room(self) -> int:
        """Return how many more jobs could fit (each weighs at least 1)."""
        return max(0, self.limit - self.used)

    def take(self, job_id: str) -> bool:
        """Claim one job; False when another worker got it first."""
        job = claim(self.db, job_id, self.worker_id, self.lease_s, self.max_attempts)
        if job is None:
            return False
        self.claimed.append(job)
        self.used += self.weight(job)
        return True


def _take_oldest(taker: _Taker, queue: str) -> None:
    """Take a queue's claimable jobs oldest first, leaving a moment to the worker a job is hinted to."""
    settled = utcnow() - timedelta(seconds=AFFINITY_GRACE_S)
    mine = or_(Job.worker_hint.is_(None), Job.worker_hint == taker.worker_id, Job.enqueued_at < settled)
    while taker.room():
        candidates = taker.db.execute(
            select(Job.id).where(*_claimable(queue, taker.max_attempts), mine)
            .order_by(Job.created_at, Job.batch_index).limit(taker.room() * 2)
        ).scalars().all()
        before = len(taker.claimed)
        for job_id in candidates:
            if taker.take(job_id) and not taker.room():
                break
        if len(taker.claimed) == before:  # nothing left here, or others took all of it
            break


def claim_next(db: Session, worker_id: str, lease_s: float, max_attempts: int, limit: int,
               queues: tuple[str, ...], weight: Callable[[Job], int] = lambda _job: 1) -> list[Job]:
    """Claim waiting jobs worth up to `limit` (each job counts `weight(job)`, e.g. its decode rows), taking
    `queues` in priority order: chat oldest first, batch items round-robin by tenant (`FAIR_QUEUES`).
    The last job may overshoot the limit: a big job is never starved."""
    taker = _Taker(db, worker_id, lease_s, max_attempts, limit, weight)
    for queue in queues:
        if not taker.room():
            break
        if queue in FAIR_QUEUES:
            take_fairly(db, queue, _claimable(queue, max_attempts), taker.room, taker.take)
        else:
            _take_oldest(taker, queue)
    return taker.claimed


def release(db: Session, job_ids: list[str], worker_id: str, count_attempt: bool) -> list[tuple[str, str]]:
    """Hand unfinished jobs this worker holds back to the queue; return their (id, queue).

    A job released because Redis or the database failed under it did not really get its attempt, so the
    attempt is given back; one released after a device fault keeps it (a job that breaks every GPU it
    meets must run out of attempts, not circle forever).
    """
    if not job_ids:
        return []
    released = db.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.worker_id == worker_id, Job.status == "running")
        .values(status="queued", worker_id=None, lease_expires_at=None, enqueued_at=utcnow(),
                attempts=Job.attempts if count_attempt else Job.attempts - 1)
        .returning(Job.id, Job.queue)
        .execution_options(synchronize_session=False)
    ).all()
    db.commit()
    return [(job_id, queue) for job_id, queue in released]


def renew_many(db: Session, job_ids: list[str], worker_id: str, lease_s: float) -> set[str]:
    """Extend this worker's leases on several jobs; return the ids it still holds."""
    if not job_ids:
        return set()
    db.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.worker_id == worker_id, Job.status == "running")
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    held = db.execute(
        select(Job.id).where(Job.id.in_(job_ids), Job.worker_id == worker_id, Job.status == "running")
    ).scalars().all()
    db.commit()
    return set(held)


@dataclass
class Outcome:
    """The result of one job attempt, written once."""

    status: str  # succeeded | failed | cancelled
    response: str = ""
    finish_reason: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    choices: list[dict[str, Any]] | None = None  # every choice, when there are several or logprobs
    image_tokens: int | None = None
    truncated_turns: int | None = None
    cached_tokens: int | None = None  # of prompt_tokens, reused from the session's prefix cache


def finish(db: Session, job_id: str, worker_id: str, outcome: Outcome) -> bool:
    """Store the outcome if this worker still holds the job; add the answer to its session. Never twice."""
    now = utcnow()
    first = outcome.timings.get("first_token_at")
    result = db.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == "running")
        .values(
            status=outcome.status,
            response=outcome.response,
            finish_reason=outcome.finish_reason,
            error_code=outcome.error_code,
            error_message=outcome.error_message,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            timings=outcome.timings,
            model=outcome.model,
            choices=outcome.choices,
            image_tokens=outcome.image_tokens,
            truncated_turns=outcome.truncated_turns,
            cached_tokens=outcome.cached_tokens,
            first_token_at=from_epoch(first) if first else None,
            finished_at=now,
            lease_expires_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        db.rollback()
        return False
    job = db.get(Job, job_id)
    if job is not None and job.session_id and outcome.status != "failed" and outcome.response:
        db.add(Message(session_id=job.session_id, role="assistant", text=outcome.response, job_id=job_id))
    if job is not None:  # counted here, with the one UPDATE that finished it: a job never counts twice
        add_usage(db, job.key_id, job.tenant, prompt_tokens=outcome.prompt_tokens or 0,
                  completion_tokens=outcome.completion_tokens or 0)
    db.commit()
    return True


def cancel(db: Session, job_id: str) -> Job | None:
    """Cancel a job: a queued one never runs; a running one is flagged for its worker. None if unknown."""
    now = utcnow()
    db.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="cancelled", finish_reason="cancelled", response="", finished_at=now, cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    db.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    db.commit()
    return load(db, job_id)


@dataclass
class Reaped:
    """What one reaper pass found."""

    requeue: list[tuple[str, str]] = field(default_factory=list)  # (job id, queue)
    stale_queued: list[tuple[str, str]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def reap(db: Session, max_attempts: int, stale_queued_s: float, dead_workers: Collection[str] = ()) -> Reaped:
    """Find jobs whose worker died (expired lease, or a worker known dead) and queued jobs lost with Redis.

    An orphan with attempts left goes back to ``queued`` at once, so any running worker admits it into its
    decode batch like any waiting job (not one at a time through its own task); one out of attempts fails.
    """
    now = utcnow()
    found = Reaped()
    orphaned = or_(Job.lease_expires_at < now, Job.worker_id.in_(list(dead_workers)))
    expired = db.execute(
        select(Job.id, Job.queue, Job.attempts, Job.cancel_requested).where(Job.status == "running", orphaned)
    ).all()
    for job_id, queue, attempts, cancel_requested in expired:
        still_orphaned = (Job.id == job_id, Job.status == "running", orphaned)
        if cancel_requested or attempts >= max_attempts:
            status, code = ("cancelled", None) if cancel_requested else ("failed", "worker_lost")
            done = db.execute(
                update(Job)
                .where(*still_orphaned)
                .values(status=status, finish_reason="cancelled" if cancel_requested else None, error_code=code,
                        error_message=None if cancel_requested else f"the worker was lost {attempts} times",
                        finished_at=now, lease_expires_at=None)
                .execution_options(synchronize_session=False)
            )
            if done.rowcount:
                (found.cancelled if cancel_requested else found.failed).append(job_id)
        else:
            requeued = db.execute(
                update(Job).where(*still_orphaned)
                .values(status="queued", worker_id=None, lease_expires_at=None, enqueued_at=now)
                .execution_options(synchronize_session=False)
            )
            if requeued.rowcount:
                found.requeue.append((job_id, queue))
    stale_before = now - timedelta(seconds=stale_queued_s)
    found.stale_queued = [
        (job_id, queue)
        for job_id, queue in db.execute(
            select(Job.id, Job.queue).where(Job.status == "queued", Job.enqueued_at < stale_before)
        ).all()
    ]
    db.commit()
    return found


def reap_abandoned_batches(db: Session, abandon_s: float) -> list[str]:
    """Delete batches whose upload stopped before it committed (a crashed web, a vanished client); return them.

    Such a batch still has ``total`` 0 and its items were never claimable; it is abandoned once no item has
    been added for ``abandon_s``.
    """
    cutoff = utcnow() - timedelta(seconds=abandon_s)
    last_item = (select(func.max(Job.created_at)).where(Job.batch_id == Batch.id).scalar_subquery())
    stale = db.execute(
        select(Batch.id).where(Batch.total == 0, Batch.created_at < cutoff,
                               or_(last_item.is_(None), last_item < cutoff))
    ).scalars().all()
    for batch_id in stale:
        db.execute(delete(Job).where(Job.batch_id == batch_id, Job.status.in_(("queued", "failed"))))
        db.execute(delete(Batch).where(Batch.id == batch_id, Batch.total == 0))
    db.commit()
    return list(stale)


def running_workers(db: Session) -> set[str]:
    """Return the workers that hold running jobs."""
    rows = db.execute(select(Job.worker_id).where(Job.status == "running", Job.worker_id.is_not(None)).distinct())
    return {worker_id for (worker_id,) in rows}


def mark_enqueued(db: Session, job_ids: list[str]) -> None:
    """Record when jobs were (re-)enqueued, so the reaper does not requeue them again at once."""
    if job_ids:
        db.execute(update(Job).where(Job.id.in_(job_ids)).values(enqueued_at=utcnow())
                   .execution_options(synchronize_session=False))
        db.commit()
