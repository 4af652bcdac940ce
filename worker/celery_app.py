"""The Celery worker: ``celery -A worker.celery_app:app worker --pool solo -Q chat,batch``."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from common.affinity import direct_queue
from common.config import get_settings
from common.deployment import check_deployment
from common.logs import configure_logging
from common.queue import RUN_JOB_TASK, make_celery
from worker.service import WorkerService

log = logging.getLogger(__name__)

settings = get_settings()
check_deployment(settings)  # production with a default database password: refuse to start
app = make_celery(settings)
_service: WorkerService | None = None


def service() -> WorkerService:
    """Return this process's worker service, creating it on first use."""
    global _service
    if _service is None:
        _service = WorkerService(settings, app)
    return _service


@signals.worker_init.connect
def _load_model(**_: object) -> None:
    """Load the model in the worker's main process before it consumes any task (solo pool)."""
    configure_logging(settings)
    service().start()


@signals.celeryd_after_setup.connect
def _direct_queue(instance: Any, **_: object) -> None:
    """Also consume this worker's own queue: next turns of the sessions whose cached prefix it holds."""
    instance.app.amqp.queues.select_add(direct_queue(service().worker_id))


@signals.worker_shutdown.connect
def _shutdown(**_: object) -> None:
    """Leave the health report on a clean shutdown."""
    if _service is not None:
        _service.stop()


@app.task(name=RUN_JOB_TASK)
def run_job(job_id: str) -> str | None:
    """Run one job by id (thin: the logic lives in worker.runner)."""
    return service().run_job(job_id)
