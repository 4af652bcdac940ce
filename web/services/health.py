"""The health report: database, Redis, queue depths and every worker's last heartbeat."""

from __future__ import annotations

import logging

import redis
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from common.queue import queue_depths
from common.schemas import HealthPublic, ServiceCheck, WorkerStatus
from web.extensions import Services
from web.services.workers import model_label, ready_workers

log = logging.getLogger(__name__)


def _check_database(services: Services) -> ServiceCheck:
    """Ping the database."""
    try:
        with services.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return ServiceCheck(ok=False, error=_short(exc))
    return ServiceCheck(ok=True)


def _check_redis(services: Services) -> ServiceCheck:
    """Ping Redis."""
    try:
        services.redis.ping()
    except redis.RedisError as exc:
        return ServiceCheck(ok=False, error=_short(exc))
    return ServiceCheck(ok=True)


def _short(exc: BaseException) -> str:
    """Return the first line of an error, without SQL or tracebacks."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def health_report(services: Services) -> HealthPublic:
    """Check every dependency; never raise, so the report itself always answers."""
    database = _check_database(services)
    cache = _check_redis(services)
    queues: dict[str, int] = {}
    workers: list[WorkerStatus] = []
    if cache.ok:  # without Redis both would only wait for their own timeouts
        try:
            queues = queue_depths(services.celery)
        except Exception as exc:  # the broker's client raises its own error types
            log.warning("queue depths unavailable: %s", exc)
        try:
            workers = services.bus.workers()
        except (redis.RedisError, ValueError) as exc:  # ValueError: a malformed heartbeat
            log.warning("worker heartbeats unavailable: %s", exc)
    ready = ready_workers(workers)
    if not (database.ok and cache.ok):
        status = "down"
    elif ready:
        status = "ok"
    else:
        status = "degraded"
    return HealthPublic(
        status=status,
        model_ready=bool(ready),
        model=model_label(ready[0]) if ready else None,
        database=database,
        redis=cache,
        queues=queues,
        workers=workers,
    )
