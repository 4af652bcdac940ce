"""Claim, lease, finish-once, cancel and reap on real SQLite and Postgres databases."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import func, select, update

from common import jobs
from common.db import make_engine, make_session_factory
from common.ids import utcnow
from common.jobspec import JobSpec, SamplingSpec, TurnSpec
from common.models import Job, Message
from tests.conftest import store_queued_job


def test_claim_is_exclusive_and_finish_happens_once(database_url):
    factory = make_session_factory(make_engine(database_url))
    with factory() as db:
        job_id = store_queued_job(db)
        first = jobs.claim(db, job_id, "w1", lease_s=30, max_attempts=3)
        assert first is not None and first.status == "running" and first.attempts == 1
        assert jobs.claim(db, job_id, "w2", lease_s=30, max_attempts=3) is None
        assert jobs.renew(db, job_id, "w1", 30) and not jobs.renew(db, job_id, "w2", 30)
        assert jobs.finish(db, job_id, "w1", jobs.Outcome("succeeded", response="answer", finish_reason="stop"))
        assert not jobs.finish(db, job_id, "w1", jobs.Outcome("succeeded", response="again"))
        assert jobs.claim(db, job_id, "w2", lease_s=30, max_attempts=3) is None
        stored = jobs.load(db, job_id)
        assert stored.response == "answer" and stored.status == "succeeded" and stored.finished_at is not None
        answers = db.scalar(select(func.count()).select_from(Message).where(Message.job_id == job_id))
        assert answers == 1


def test_expired_lease_is_reclaimed_and_the_old_worker_cannot_finish(database_url):
    factory = make_session_factory(make_engine(database_url))
    with factory() as db:
        job_id = store_queued_job(db)
        assert jobs.claim(db, job_id, "dead", lease_s=0.2, max_attempts=3)
        time.sleep(0.4)
        found = jobs.reap(db, max_attempts=3, stale_queued_s=60)
        assert found.requeue == [(job_id, "chat")]
        second = jobs.claim(db, job_id, "alive", lease_s=30, max_attempts=3)
        assert second is not None and second.attempts == 2 and second.worker_id == "alive"
        assert not jobs.finish(db, job_id, "dead", jobs.Outcome("succeeded", response="zombie"))
        assert jobs.finish(db, job_id, "alive", jobs.Outcome("succeeded", response="real"))
        assert jobs.load(db, job_id).response == "real"


def test_cancel_queued_never_runs_and_cancel_running_is_flagged(database_url):
    factory = make_session_factory(make_engine(database_url))
    with factory() as db:
        queued = store_queued_job(db)
        assert jobs.cancel(db, queued).status == "cancelled"
        assert jobs.claim(db, queued, "w", lease_s=30, max_attempts=3) is None
        running = store_queued_job(db)
        jobs.claim(db, running, "w", lease_s=30, max_attempts=3)
        flagged = jobs.cancel(db, running)
        assert flagged.status == "running" and flagged.cancel_requested
        assert jobs.finish(db, running, "w", jobs.Outcome("cancelled", response="partial", finish_reason="cancelled"))
        assert jobs.load(db, running).response == "partial"
        assert jobs.cancel(db, "job_unknown") is None


def test_reaper_fails_jobs_after_max_attempts_and_cancels_flagged_orphans(database_url):
    factory = make_session_factory(make_engine(database_url))
    with factory() as db:
        exhausted = store_queued_job(db)
        jobs.claim(db, exhausted, "w", lease_s=0.1, max_attempts=1)
        orphan = store_queued_job(db)
        jobs.claim(db, orphan, "w", lease_s=0.1, max_attempts=3)
        jobs.cancel(db, orphan)
        stale = store_queued_job(db)
        db.execute(update(Job).where(Job.id == stale).values(enqueued_at=utcnow() - timedelta(seconds=120)))
        db.commit()
        time.sleep(0.3)
        found = jobs.reap(db, max_attempts=1, stale_queued_s=60)
        assert found.failed == [exhausted] and found.cancelled == [orphan] and found.requeue == []
        assert found.stale_queued == [(stale, "chat")]
        assert jobs.load(db, exhausted).error_code == "worker_lost"
        assert jobs.load(db, orphan).status == "cancelled"


def test_claim_next_takes_chat_before_batch_oldest_first_and_skips_taken_jobs(database_url):
    factory = make_session_factory(make_engine(database_url))
    with factory() as db:
        batch = [store_queued_job(db, queue="batch") for _ in range(3)]
        chat = [store_queued_job(db, queue="chat") for _ in range(2)]
        jobs.claim(db, chat[0], "other", lease_s=30, max_attempts=3)
        cancelled = store_queued_job(db, queue="chat")
        jobs.cancel(db, cancelled)
        taken = jobs.claim_next(db, "me", 30, 3, limit=2, queues=("chat", "batch"))
        assert [j.id for j in taken] == [chat[1], batch[0]]
        assert [j.id for j in jobs.claim_next(db, "me", 30, 3, limit=5, queues=("batch",))] == batch[1:]
        assert jobs.claim_next(db, "me", 30, 3, limit=5, queues=("chat", "batch")) == []
        held = jobs.renew_many(db, [chat[0], chat[1], batch[0]], "me", 30)
        assert held == {chat[1], batch[0]}


def test_claim_next_counts_each_job_by_its_rows(database_url):
    from worker.runner import _rows

    factory = make_session_factory(make_engine(database_url))
    with factory() as db:
        spec = JobSpec(turns=[TurnSpec(role="user", text="hi")], sampling=SamplingSpec(n=3)).stored()
        wide = [store_queued_job(db, spec=spec) for _ in range(3)]
        single = store_queued_job(db)
        # 8 rows of room: two 3-choice jobs (6 rows), then the third fits only by overshooting; it is taken
        # (never starved) and then nothing more.
        taken = jobs.claim_next(db, "me", 30, 3, limit=8, queues=("chat",), weight=_rows)
        assert [j.id for j in taken] == wide
        assert [j.id for j in jobs.claim_next(db, "me", 30, 3, limit=1, queues=("chat",), weight=_rows)] == [single]
