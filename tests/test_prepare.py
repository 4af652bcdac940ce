"""The prepare pool, with a real runner, SQLite, Redis and the demo model: jobs that join a running decode batch are
prepared off the loop, give the answers inline preparation gives, fail alone, and never run once cancelled."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy.orm import Session, sessionmaker

from common import jobs
from common.bus import TokenBus
from common.config import Settings
from common.db import make_engine, make_session_factory
from common.ids import new_id
from common.jobspec import JobSpec, SamplingSpec, StopSpec, TurnSpec
from common.models import StoredImage
from devtools.databases import make_image, migrate
from tests.conftest import store_queued_job
from worker.choices import requests_for
from worker.engine import Engine, GenerationRequest
from worker.prepare import load_images, pool_size, read_spec
from worker.runner import JobRunner

REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('TEST_REDIS_DB', '14')}"
COLORS = [(200, 30, 30), (30, 160, 40), (20, 60, 220)]


@pytest.fixture
def db(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    return make_session_factory(make_engine(url))


def _store_image(db: sessionmaker[Session], color: tuple[int, int, int]) -> str:
    png = make_image((96, 64), color)
    with db() as session:
        image = StoredImage(id=new_id("img"), sha256=hashlib.sha256(png).hexdigest(), data=png, width=96, height=64,
                            size_bytes=len(png), source_format="png")
        session.add(image)
        session.commit()
        return image.id


def _job(db: sessionmaker[Session], tokens: int, image_id: str | None = None) -> str:
    """Queue a greedy job of exactly ``tokens`` tokens, about one stored image (or none)."""
    turn = TurnSpec(role="user", text="What is this?", image_ids=[image_id] if image_id else [])
    spec = JobSpec(turns=[turn], sampling=SamplingSpec(temperature=0.0), stop=StopSpec(max_tokens=tokens,
                                                                                       min_tokens=tokens))
    with db() as session:
        return store_queued_job(session, spec=spec.stored())


def _solo(engine: Engine, db: sessionmaker[Session], job_id: str) -> str:
    """Answer a job alone, directly on the engine, prepared inline."""
    with db() as session:
        spec = read_spec(jobs.load(session, job_id))
        [request] = requests_for(job_id, spec, load_images(session, spec.image_ids()), None)
    return engine.generate([request])[0].text


def _runner(settings: Settings, engine: Engine, db: sessionmaker[Session], kind: str = "thread") -> JobRunner:
    bus = TokenBus(redis.Redis.from_url(REDIS_URL))
    run_settings = settings.model_copy(update={"prepare_workers": 1, "prepare_kind": kind, "admit_interval_s": 0.01})
    runner = JobRunner(run_settings, lambda: engine, db, bus, "pool-test")
    deadline = time.monotonic() + 120
    while runner.preparer(engine) is None:  # a process pool starts in the background
        assert time.monotonic() < deadline, "the pool never started"
        time.sleep(0.05)
    return runner


def _while_running(runner: JobRunner, db: sessionmaker[Session]) -> tuple[str, list[threading.Thread]]:
    """Start a long job on a thread; once it decodes, return it and the thread (the caller queues more)."""
    long_job = _job(db, 60)
    thread = threading.Thread(target=runner.run, args=(long_job,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while runner.bus.snapshot(long_job)[0] < 3:  # its first tokens are out: the decode batch runs
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.01)
    return long_job, [thread]


@pytest.mark.parametrize("kind", ["thread", pytest.param("process", marks=pytest.mark.soak)])
def test_jobs_joining_a_running_batch_are_prepared_in_the_pool_and_answer_as_inline(settings, engine, db,
                                                                                     monkeypatch, kind):
    runner = _runner(settings, engine, db, kind)
    prepared_on: dict[str, str] = {}
    real = engine.prepare_ahead

    def spy(request: GenerationRequest):  # type: ignore[no-untyped-def]
        prepared_on[request.request_id.partition("#")[0]] = threading.current_thread().name
        return real(request)

    monkeypatch.setattr(engine, "prepare_ahead", spy)
    long_job, [thread] = _while_running(runner, db)
    images = [_store_image(db, color) for color in COLORS]
    joined = [_job(db, 6, image_id) for image_id in images]
    missing = _job(db, 6, "img_gone")  # its image is not stored: it fails alone, in the pool
    thread.join(timeout=60)
    runner.close()
    with db() as session:
        stored = {job_id: jobs.load(session, job_id) for job_id in [long_job, *joined, missing]}
    assert stored[long_job].status == "succeeded" and stored[long_job].completion_tokens == 60
    assert stored[missing].status == "failed" and stored[missing].error_code == "invalid_request"
    assert "img_gone" in stored[missing].error_message
    for job_id in joined:
        if kind == "thread":  # a pool process's calls are not seen here; it is not the decode thread either
            assert prepared_on[job_id].startswith("vlgate-prepare"), "prepared in the decode thread"
        else:
            assert job_id not in prepared_on, "prepared in the decode thread"
        assert stored[job_id].status == "succeeded"
    monkeypatch.undo()
    assert [stored[j].response for j in joined] == [_solo(engine, db, j) for j in joined]


def test_a_job_cancelled_while_it_is_prepared_never_runs(settings, engine, db, monkeypatch):
    runner = _runner(settings, engine, db)
    entered, release = threading.Event(), threading.Event()
    real = engine.prepare_ahead

    def slow(request: GenerationRequest):  # type: ignore[no-untyped-def]
        entered.set()
        release.wait(30)
        return real(request)

    monkeypatch.setattr(engine, "prepare_ahead", slow)
    long_job, [thread] = _while_running(runner, db)
    doomed = _job(db, 6, _store_image(db, COLORS[0]))
    assert entered.wait(30), "the job never reached the pool"
    with db() as session:  # what DELETE /api/jobs/<id> does to a running job
        assert jobs.cancel(session, doomed).cancel_requested
    runner.bus.request_cancel(doomed)
    release.set()
    thread.join(timeout=60)
    runner.close()
    with db() as session:
        job, long = jobs.load(session, doomed), jobs.load(session, long_job)
    assert long.status == "succeeded"
    assert job.status == "cancelled" and job.response == "" and not job.completion_tokens and not job.prompt_tokens
    assert job.finish_reason == "cancelled"


def test_the_pool_is_on_by_default_only_where_the_decode_loop_leaves_cores_free():
    assert pool_size(Settings(), "cpu") == 0  # torch's threads use every core: a pool only spreads the stall
    assert pool_size(Settings(), "cuda:0") == 1
    assert pool_size(Settings(prepare_workers=2), "cpu") == 2 and pool_size(Settings(prepare_workers=0), "cuda:0") == 0
