"""The worker process's behaviour around failures, with a real database and Redis: a device fault heals or
restarts the worker, a Redis or database blip never disables it, a job's own failure fails only that job."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from common.config import Settings
from common.models import Job
from common.queue import EXIT_DEVICE_FAULT, make_celery
from common.schemas import WorkerStatus
from tests.conftest import store_queued_job
from worker.engine import ModelInfo
from worker.service import WorkerService

REDIS_URL = "redis://127.0.0.1:6379/12"
EXITS: list[int] = []  # exit codes a service asked for


class _FailingEngine:
    """Stands in for an engine whose generate raises (no CUDA here to break for real); ``healthy_after``
    calls it works again (a real forward is then not needed: the self-check only needs an answer)."""

    info = ModelInfo("m", "m", "m", False, "cuda:0", "bfloat16", 1, 4096)

    def __init__(self, error: Exception, healthy_after: int | None = None) -> None:
        from worker.prefix_cache import PrefixCache
        from worker.vision_cache import VisionCache

        self.error, self.healthy_after, self.calls = error, healthy_after, 0
        self.prefixes, self.vision = PrefixCache(1 << 20), VisionCache(1 << 20)

    def generate(self, requests: list, *args: object, **kwargs: object) -> list:
        self.calls += 1
        if self.healthy_after is None or self.calls <= self.healthy_after:
            raise self.error
        from worker.engine import GenerationResult

        return [GenerationResult(r.request_id, "pong", "length", 1, 1) for r in requests]


def _service(tmp_path: Path, engine: _FailingEngine) -> WorkerService:
    from devtools.databases import migrate

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    redis.Redis.from_url(REDIS_URL).flushdb()
    settings = Settings(database_url=url, redis_url=REDIS_URL, data_dir=tmp_path, worker_id="flaky",
                        service_wait_s=5)
    service = WorkerService(settings, make_celery(settings))
    service.engine = engine
    service.status.state = "idle"
    service.exit = EXITS.append  # record instead of leaving the test process
    EXITS.clear()
    return service


def _queued_job(service: WorkerService) -> str:
    with service.db() as db:
        return store_queued_job(db, max_tokens=4)


def _job(service: WorkerService, job_id: str) -> Job:
    with service.db() as db:
        return db.execute(select(Job).where(Job.id == job_id)).scalar_one()


def _reported(service: WorkerService) -> WorkerStatus:
    return {w.worker_id: w for w in service.bus.workers()}["flaky"]


def test_a_device_that_stays_broken_hands_the_job_back_and_exits_for_a_restart(tmp_path: Path):
    service = _service(tmp_path, _FailingEngine(RuntimeError("CUDA error: an illegal memory access")))
    job_id = _queued_job(service)
    assert service.run_job(job_id) is None
    job = _job(service, job_id)
    # The job was not failed for the GPU's sake: it is queued again, its attempt counted (a job that breaks
    # every GPU must run out of attempts), and re-enqueued for another worker.
    assert job.status == "queued" and job.attempts == 1 and job.worker_id is None
    assert service.bus.redis.llen("chat") == 1
    reported = _reported(service)
    assert reported.state == "error" and "CUDA" in reported.error and "self-check" in reported.error
    assert EXITS == [EXIT_DEVICE_FAULT]
    # Until the restart, an unhealthy worker takes no work.
    second = _queued_job(service)
    assert service.run_job(second) is None and _job(service, second).status == "queued"
    service.stop()


def test_a_device_that_recovers_keeps_the_worker_serving(tmp_path: Path):
    service = _service(tmp_path, _FailingEngine(RuntimeError("CUDA out of memory"), healthy_after=1))
    job_id = _queued_job(service)
    assert service.run_job(job_id) is None
    assert EXITS == [] and _reported(service).state == "idle"
    assert _job(service, job_id).status == "queued"
    service.stop()


@pytest.mark.parametrize("error", [redis.ConnectionError("Connection refused"), redis.TimeoutError("timed out")])
def test_a_redis_blip_never_disables_the_worker_and_loses_no_job(tmp_path: Path, error: Exception):
    service = _service(tmp_path, _FailingEngine(error))
    job_id = _queued_job(service)
    assert service.run_job(job_id) is None
    job = _job(service, job_id)
    assert job.status == "queued" and job.attempts == 0  # the blip did not use up an attempt
    assert service.bus.redis.llen("chat") == 1
    assert _reported(service).state == "idle" and EXITS == []
    service.stop()


def test_a_bug_met_by_a_job_fails_that_job_only(tmp_path: Path):
    service = _service(tmp_path, _FailingEngine(ValueError("something about this job")))
    job_id = _queued_job(service)
    assert service.run_job(job_id) == "failed"
    job = _job(service, job_id)
    assert job.status == "failed" and job.error_code == "generation_failed" and "this job" in job.error_message
    assert service.bus.snapshot(job_id)[2]["code"] == "generation_failed"
    assert _reported(service).state == "idle"
    service.stop()


def test_a_worker_without_a_model_claims_nothing(tmp_path: Path):
    service = _service(tmp_path, _FailingEngine(ValueError("unused")))
    service.engine = None
    job_id = _queued_job(service)
    assert service.run_job(job_id) is None
    assert _job(service, job_id).status == "queued" and _job(service, job_id).attempts == 0
    service.stop()


def test_a_restarted_worker_hands_back_what_its_previous_process_held(tmp_path: Path):
    from common import jobs

    service = _service(tmp_path, _FailingEngine(ValueError("unused")))
    job_id = _queued_job(service)
    with service.db() as db:  # the previous process under the same id took it, then died
        assert jobs.claim(db, job_id, "flaky", lease_s=3600, max_attempts=3) is not None
    service._reclaim_own_jobs()
    job = _job(service, job_id)
    assert job.status == "queued" and job.worker_id is None and job.attempts == 1
    assert service.bus.redis.llen("chat") == 1
    service.stop()


def test_a_device_fault_empties_the_caches(tmp_path: Path):
    import torch

    engine = _FailingEngine(RuntimeError("CUDA error: an illegal memory access"), healthy_after=1)
    engine.prefixes.put("k", [1, 2], [], [(torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2, 1))])
    service = _service(tmp_path, engine)
    service._heal(RuntimeError("CUDA error: an illegal memory access"))
    assert len(engine.prefixes) == 0 and engine.prefixes.bytes == 0
