"""The worker process's behaviour around failures, with a real database and Redis."""

from __future__ import annotations

from pathlib import Path

import redis
from sqlalchemy import select

from common.config import Settings
from common.models import Job
from common.queue import make_celery
from tests.conftest import store_queued_job
from worker.engine import ModelInfo
from worker.service import WorkerService

REDIS_URL = "redis://127.0.0.1:6379/12"


class _BrokenGpu:
    """Stands in for an engine whose GPU fails mid-generation (no CUDA here to break for real)."""

    info = ModelInfo("m", "m", "m", False, "cuda:0", "bfloat16", 1, 4096)

    def generate(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _service(tmp_path: Path) -> WorkerService:
    from tests.conftest import migrate

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    redis.Redis.from_url(REDIS_URL).flushdb()
    settings = Settings(database_url=url, redis_url=REDIS_URL, data_dir=tmp_path, worker_id="broken")
    return WorkerService(settings, make_celery(settings))


def _queued_job(service: WorkerService) -> str:
    with service.db() as db:
        return store_queued_job(db, max_tokens=4)


def test_a_cuda_error_fails_the_job_and_marks_the_worker_unhealthy_without_killing_it(tmp_path: Path):
    service = _service(tmp_path)
    service.engine = _BrokenGpu()  # type: ignore[assignment]
    service.status.state = "idle"
    job_id = _queued_job(service)
    assert service.run_job(job_id) == "failed"
    with service.db() as db:
        job = db.execute(select(Job).where(Job.id == job_id)).scalar_one()
    assert job.status == "failed" and job.error_code == "generation_failed" and "CUDA" in job.error_message
    reported = {w.worker_id: w for w in service.bus.workers()}["broken"]
    assert reported.state == "error" and "CUDA" in reported.error
    # An unhealthy worker takes no more work: the next job stays queued for a healthy worker.
    second = _queued_job(service)
    assert service.run_job(second) is None
    with service.db() as db:
        assert db.execute(select(Job.status).where(Job.id == second)).scalar_one() == "queued"
    assert service.bus.snapshot(job_id)[2]["code"] == "generation_failed"
    service.stop()
