"""Fair share between tenants: batch work is claimed round-robin by tenant, so one tenant's 10,000-item batch
cannot starve another tenant's 10-item batch submitted after it (both progress)."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import ColumnElement, func, select, text
from sqlalchemy.orm import Session

from common.models import Job

# Queues whose jobs are shared out by tenant (common.queue.BATCH_QUEUE); the others are taken oldest first.
FAIR_QUEUES = frozenset({"batch"})

# Every tenant with a waiting job in a queue, by a skip scan of ix_jobs_queue_status_tenant: one index probe per
# tenant, instead of reading every waiting row (a 10,000-item batch is 10,000 rows but one tenant).
_WAITING_TENANTS = text("""
    WITH RECURSIVE waiting(tenant) AS (
        SELECT MIN(tenant) FROM jobs WHERE queue = :queue AND status = 'queued'
        UNION ALL
        SELECT (SELECT MIN(tenant) FROM jobs WHERE queue = :queue AND status = 'queued' AND tenant > waiting.tenant)
        FROM waiting WHERE waiting.tenant IS NOT NULL
    )
    SELECT tenant FROM waiting WHERE tenant IS NOT NULL
""")

Head = tuple[datetime, int, str]  # a waiting job: (created_at, batch_index, id), in the order it is owed


def waiting_tenants(db: Session, queue: str) -> list[str]:
    """Return the tenants with a queued job in a queue."""
    return list(db.execute(_WAITING_TENANTS, {"queue": queue}).scalars())


def running_by_tenant(db: Session, queue: str) -> dict[str, int]:
    """Return how many jobs of a queue each tenant has running now, on every worker."""
    counts = db.execute(
        select(Job.tenant, func.count()).where(Job.queue == queue, Job.status == "running").group_by(Job.tenant)
    ).all()
    return {tenant: count for tenant, count in counts}


def oldest_waiting(db: Session, claimable: tuple[ColumnElement[bool], ...], tenant: str, count: int) -> list[Head]:
    """Return a tenant's `count` oldest claimable jobs."""
    rows = db.execute(
        select(Job.created_at, Job.batch_index, Job.id).where(*claimable, Job.tenant == tenant)
        .order_by(Job.created_at, Job.batch_index).limit(count)
    ).all()
    return [(created, -1 if index is None else index, job_id) for created, index, job_id in rows]


def take_fairly(db: Session, queue: str, claimable: tuple[ColumnElement[bool], ...], room: Callable[[], int],
                take: Callable[[str], bool]) -> None:
    """Claim a queue's jobs while there is `room()`: next is always the tenant running the fewest of them (ties:
    the one whose oldest waiting job is oldest), and its oldest job. `take(id)` claims one, False if lost."""
    turns: list[tuple[int, datetime, int, str]] = []  # (running jobs, its oldest waiting job's order, tenant)
    heads: dict[str, deque[Head]] = {}
    running = running_by_tenant(db, queue) if room() else {}
    for tenant in waiting_tenants(db, queue) if room() else []:
        heads[tenant] = deque(oldest_waiting(db, claimable, tenant, room()))
        if heads[tenant]:
            turns.append((running.get(tenant, 0), *heads[tenant][0][:2], tenant))
    heapq.heapify(turns)
    while turns and room():
        count, _, _, tenant = heapq.heappop(turns)
        waiting = heads[tenant]
        if take(waiting.popleft()[2]):
            count += 1
        if not waiting and room():  # other workers took ours, or we used them up: look again
            waiting.extend(oldest_waiting(db, claimable, tenant, room()))
        if waiting:
            heapq.heappush(turns, (count, *waiting[0][:2], tenant))
