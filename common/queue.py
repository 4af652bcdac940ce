"""The queue contract: Celery configured for long GPU tasks, queue names, and how a job is enqueued."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from common.affinity import AFFINITY_GRACE_S, direct_queue
from common.config import Settings

RUN_JOB_TASK = "vlgate.run_job"
CHAT_QUEUE = "chat"
BATCH_QUEUE = "batch"
QUEUES = (CHAT_QUEUE, BATCH_QUEUE)  # in priority order: chat is always served first
# A worker whose GPU stays broken after a fault exits with this (EX_TEMPFAIL): its supervisor (make run,
# the worker container) starts a fresh process.
EXIT_DEVICE_FAULT = 75


def make_celery(settings: Settings) -> Celery:
    """Create the Celery app both sides use; the worker registers the task on it."""
    app = Celery("vlgate", broker=settings.redis_url)
    app.conf.update(
        task_queues=[Queue(name, routing_key=name) for name in QUEUES],
        task_default_queue=CHAT_QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # the database is the source of truth for results
        task_acks_late=True,  # a task is acknowledged after it ran ...
        task_reject_on_worker_lost=True,  # ... and redelivered if its worker died
        worker_prefetch_multiplier=1,  # hold no task we are not working on
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Consult queues in the order given (chat before batch) instead of round robin.
            "queue_order_strategy": "priority",
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
    )
    return app


def enqueue(app: Celery, job_id: str, queue: str, worker: str | None = None) -> None:
    """Send a job id (never its data) to a queue; call only after the job row is committed.

    With ``worker`` (it holds the conversation's cache) the id goes to that worker's own queue, and to the shared
    queue too, due when the hint's grace ends: if the holder is busy or gone, an idle worker takes it then (a
    worker whose task finds its job taken runs whatever else waits).
    """
    target = direct_queue(worker) if worker else queue
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=target, routing_key=target)
    if worker:
        app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue, routing_key=queue, countdown=AFFINITY_GRACE_S)


def queue_depths(app: Celery) -> dict[str, int]:
    """Return how many tasks wait in each queue of the Redis broker."""
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        return {name: int(client.llen(name)) for name in QUEUES}
