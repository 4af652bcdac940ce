"""Fair share between tenants: batch work is claimed round-robin by tenant (chat still first), on SQLite and
Postgres; and through a real worker, a small batch submitted after a big one of another tenant ends long before it."""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select, update

from common import jobs
from common.db import make_engine, make_session_factory
from common.ids import new_id, utcnow
from common.keys import create_key
from common.models import Batch, Job
from devtools import live
from tests.conftest import store_queued_job


def _batch(db, tenant: str, size: int, age_s: float = 0) -> list[str]:  # type: ignore[no-untyped-def]
    """Store a committed batch of `size` queued items for a tenant, made `age_s` seconds ago; return the ids."""
    made = utcnow() - timedelta(seconds=age_s)
    batch = Batch(id=new_id("batch"), tenant=tenant, total=size, created_at=made)
    db.add(batch)
    items = [Job(id=new_id("job"), tenant=tenant, batch_id=batch.id, batch_index=i, queue="batch", prompt=f"p{i}",
                 created_at=made, enqueued_at=made) for i in range(size)]
    db.add_all(items)
    db.commit()
    return [item.id for item in items]


def _finish(db, job_ids: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Mark claimed jobs succeeded (as a worker would), so they no longer count as running."""
    for job_id in job_ids:
        assert jobs.finish(db, job_id, "me", jobs.Outcome("succeeded", response="ok"))


def test_claims_alternate_between_a_big_older_batch_and_a_small_later_one(database_url: str):
    factory = make_session_factory(make_engine(database_url))
    with factory() as db:
        big = _batch(db, "tenant-a", 200, age_s=60)  # submitted a minute before the small one
        small = _batch(db, "tenant-b", 10)
        order: list[str] = []
        for _ in range(5):
            taken = jobs.claim_next(db, "me", 30, 3, limit=4, queues=("chat", "batch"))
            order += [job.tenant for job in taken]
            _finish(db, [job.id for job in taken])
        # Neither waits for the other: one of each, the older batch's tenant first on a tie.
        assert order[:20] == ["tenant-a", "tenant-b"] * 10
        # Each tenant's items are taken in their own order.
        taken_ids = db.scalars(select(Job.id).where(Job.status == "succeeded").order_by(Job.finished_at)).all()
        assert [i for i in taken_ids if i in set(small)] == small
        assert [i for i in taken_ids if i in set(big)] == big[:10]
        # B is done; A goes on alone, nothing is lost.
        rest = jobs.claim_next(db, "me", 30, 3, limit=8, queues=("batch",))
        assert {job.tenant for job in rest} == {"tenant-a"} and [job.id for job in rest] == big[10:18]


def test_the_tenant_running_fewer_items_goes_next_counting_every_worker(database_url: str):
    factory = make_session_factory(make_engine(database_url))
    with factory() as db:
        big = _batch(db, "tenant-a", 50, age_s=60)
        # Another worker already runs 6 of A's items: this worker gives B its share first.
        held = jobs.claim_next(db, "other", 30, 3, limit=6, queues=("batch",))
        assert [job.id for job in held] == big[:6]
        _batch(db, "tenant-b", 5)
        _batch(db, "tenant-c", 5, age_s=30)
        taken = [job.tenant for job in jobs.claim_next(db, "me", 30, 3, limit=8, queues=("batch",))]
        # B and C (none running) alternate, C first (its batch is older), up to 4 each: still fewer than A's 6.
        assert Counter(taken) == {"tenant-c": 4, "tenant-b": 4}
        assert taken[:2] == ["tenant-c", "tenant-b"]
        more = [job.tenant for job in jobs.claim_next(db, "me", 30, 3, limit=4, queues=("batch",))]
        # C and B have 5 waiting and 4 running each; their last items come before A's seventh.
        assert Counter(more) == {"tenant-c": 1, "tenant-b": 1, "tenant-a": 2}
        assert more[:2] == ["tenant-c", "tenant-b"]


def test_chat_still_comes_first_and_unclaimable_items_are_skipped(database_url: str):
    factory = make_session_factory(make_engine(database_url))
    with factory() as db:
        _batch(db, "tenant-a", 20, age_s=60)
        streaming = _batch(db, "tenant-b", 3)
        # B's upload is still streaming in (not committed): its items must not be claimed, nor block A.
        db.execute(update(Job).where(Job.id.in_(streaming)).values(enqueued_at=None))
        db.commit()
        chats = [store_queued_job(db, tenant=t) for t in ("tenant-b", "tenant-a")]
        taken = jobs.claim_next(db, "me", 30, 3, limit=4, queues=("chat", "batch"))
        assert [job.id for job in taken[:2]] == chats  # chat first, oldest first, whoever's tenant
        assert [job.tenant for job in taken[2:]] == ["tenant-a", "tenant-a"]
        waiting = db.scalar(select(func.count()).select_from(Job).where(Job.id.in_(streaming), Job.status == "queued"))
        assert waiting == 3


def test_a_claim_lost_to_another_worker_is_replaced_by_the_same_tenants_next_item(database_url: str,
                                                                                 monkeypatch: pytest.MonkeyPatch):
    factory = make_session_factory(make_engine(database_url))
    with factory() as db:
        big = _batch(db, "tenant-a", 12, age_s=60)
        stolen: list[str] = []
        real_claim = jobs.claim

        def racing_claim(db_, job_id, worker_id, lease_s, max_attempts):  # type: ignore[no-untyped-def]
            # Another worker takes every other item of A just before this one gets to it.
            if job_id in big[:6:2] and job_id not in stolen:
                stolen.append(job_id)
                assert real_claim(db_, job_id, "other", lease_s, max_attempts) is not None
            return real_claim(db_, job_id, worker_id, lease_s, max_attempts)

        monkeypatch.setattr(jobs, "claim", racing_claim)  # claim_next looks it up in the module at call time
        taken = jobs.claim_next(db, "me", 30, 3, limit=4, queues=("batch",))
        assert [job.id for job in taken] == [big[1], big[3], big[5], big[6]]


# --- through the whole service -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_small_batch_submitted_later_finishes_while_a_big_one_still_waits(tmp_path: Path, data_dir: Path):
    big_size, small_size = 160, 10
    with live.running_stack("sqlite", tmp_path, data_dir, "fair-w1", VLGATE_KEY_CACHE_S="0") as stack:
        factory = make_session_factory(make_engine(stack.database_url))
        with factory() as db:
            keys = {tenant: create_key(db, tenant, tenant=tenant).secret for tenant in ("tenant-a", "tenant-b")}

        def submit(tenant: str, size: int) -> str:
            items = [{"prompt": f"{tenant} item {i}?", "max_tokens": 8, "temperature": 0} for i in range(size)]
            answer = requests.post(f"{stack.base}/api/batches", json={"items": items}, timeout=60,
                                   headers={"Authorization": f"Bearer {keys[tenant]}"})
            assert answer.status_code == 202, answer.text
            return answer.json()["batch_id"]

        def counts(batch_id: str) -> Counter[str]:
            with factory() as db:
                return Counter(dict(db.execute(select(Job.status, func.count()).where(Job.batch_id == batch_id)
                                               .group_by(Job.status)).all()))

        big = submit("tenant-a", big_size)
        live.wait_until(lambda: counts(big)["succeeded"] >= 8, 60, 0.1, "the big batch to be under way")
        submitted = time.monotonic()
        small = submit("tenant-b", small_size)
        live.wait_until(lambda: counts(small)["succeeded"] == small_size, 60, 0.1, "the small batch to finish")
        small_s = time.monotonic() - submitted
        left = counts(big)
        print(f"fair share: tenant-b's {small_size} items took {small_s:.1f} s; tenant-a then had "
              f"{left['queued']} of {big_size} still queued, {left['running']} running")
        # B did not wait behind A: most of A's batch is still waiting when B's is done.
        assert left["queued"] >= big_size // 2, left
        live.wait_until(lambda: counts(big)["succeeded"] == big_size, 120, 0.2, "the big batch to finish")
