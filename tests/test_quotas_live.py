"""Backpressure over real HTTP: gunicorn web, Postgres, a private Redis, then a real Celery worker.

A burst of 500 concurrent requests against a 100-job cap admits at most 100, stores each admitted one whole
and nothing of the others, and every admitted job completes; the official ``openai`` SDK backs off on a
429's ``Retry-After`` by itself and succeeds once there is room.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import requests
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.bus import TokenBus
from common.keys import KeyLimits, create_key
from common.models import ChatSession, Job, Message
from common.schemas import WorkerStatus
from devtools import live
from devtools.databases import fresh_database
from devtools.live import Stack

pytestmark = pytest.mark.slow

CAP = 100
BURST = 500


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Stack]:
    """A deployment on Postgres with a 100-job chat cap, keys required, and no worker yet."""
    tmp = tmp_path_factory.mktemp("quotas-live")
    databases = fresh_database("postgres", tmp)
    deployment = Stack(next(databases), data_dir, tmp, VLGATE_MAX_QUEUED_CHAT=str(CAP), VLGATE_KEY_CACHE_S="0")
    try:
        live.wait_for_web(deployment.base)
        yield deployment
    except Exception:
        print(deployment.logs())
        raise
    finally:
        deployment.stop()
        next(databases, None)


def make_key(stack: Stack, name: str, **limits: int) -> dict[str, str]:
    """Make a key in the stack's database; return its Authorization header."""
    with Session(stack.db) as db:
        secret = create_key(db, name, limits=KeyLimits(**limits)).secret
    return {"Authorization": f"Bearer {secret}"}


def announce_loaded_model(stack: Stack) -> None:
    """Store a loaded worker's heartbeat, as a worker does, so the web admits jobs while none is consumed."""
    now = time.time()
    status = WorkerStatus(worker_id="held-back", hostname="testhost", pid=os.getpid(), state="idle", device="cpu",
                          model="demo", model_label="demo", is_demo=True, loaded=True, started_at=now,
                          last_heartbeat=now)
    bus(stack).beat(status, ttl_s=120)


def bus(stack: Stack) -> TokenBus:
    return TokenBus(redis.Redis.from_url(stack.env["VLGATE_REDIS_URL"]))


def start_worker(stack: Stack, name: str = "w-quotas") -> None:
    """Start a real worker and wait for its model (read from Redis: /api/health lists workers to admins only)."""
    stack.workers.append(live.worker(name, stack.env, stack.log_dir).start())
    live.wait_until(lambda: any(w.worker_id == name and w.loaded for w in bus(stack).workers()), 90, 0.3,
                    f"worker {name} to load its model")


def test_a_burst_of_500_against_a_cap_of_100(stack: Stack, data_dir: Path) -> None:
    assert not stack.workers, "the burst must run before any worker takes jobs off the queue"
    announce_loaded_model(stack)
    keys = [make_key(stack, "burst-a"), make_key(stack, "burst-b")]

    def submit(i: int) -> tuple[int, str | None, dict[str, Any]]:
        body = {"prompt": f"burst {i}", "max_tokens": 1, "temperature": 0}
        answer = requests.post(f"{stack.base}/api/jobs", json=body, headers=keys[i % 2], timeout=60)
        return answer.status_code, answer.headers.get("Retry-After"), answer.json()

    started = time.monotonic()
    with ThreadPoolExecutor(48) as pool:
        results = list(pool.map(submit, range(BURST)))
    burst_s = time.monotonic() - started
    accepted = {body["job_id"] for status, _, body in results if status == 202}
    refused = [(status, retry, body) for status, retry, body in results if status != 202]
    print(f"burst of {BURST}: {burst_s:.1f} s")
    assert len(accepted) == CAP, f"{len(accepted)} admitted"
    assert {(status, body["error"]["code"]) for status, _, body in refused} == {(503, "queue_full")}
    assert all(retry is not None and 1 <= int(retry) <= 60 for _, retry, _ in refused)
    with Session(stack.db) as db:  # every admitted job is stored whole, and nothing else is
        assert set(db.scalars(select(Job.id))) == accepted
        whole = (select(func.count()).select_from(Job).join(ChatSession, ChatSession.id == Job.session_id)
                 .join(Message, (Message.id == Job.user_message_id) & (Message.job_id == Job.id)))
        assert db.scalar(whole) == CAP
        assert db.scalar(select(func.count()).select_from(ChatSession)) == CAP
        assert db.scalar(select(func.count()).select_from(Message)) == CAP

    start_worker(stack)

    def finished() -> bool:
        with Session(stack.db) as db:
            statuses = db.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        assert "failed" not in dict(statuses), statuses
        return dict(statuses).get("succeeded") == CAP

    live.wait_until(finished, 90, 0.5, "every admitted job to succeed")


def test_the_openai_sdk_waits_out_a_429_by_itself(stack: Stack) -> None:
    if not stack.workers:
        start_worker(stack)
    header = make_key(stack, "one-at-a-time", max_queued=1)
    body = {"prompt": "Describe every detail.", "temperature": 0, "max_tokens": 2048, "min_tokens": 2048}
    long_job = requests.post(f"{stack.base}/api/jobs", json=body, headers=header, timeout=30).json()["job_id"]
    live.wait_until(lambda: stack.job_row(long_job).status == "running", 30, 0.05, "the long job to run")
    refusals: list[tuple[str | None, str]] = []

    def on_response(response: Any) -> None:
        """See each answer the SDK gets; the first refusal lets the long job end (cancelled) so room frees up."""
        if response.status_code == 429:
            response.read()
            refusals.append((response.headers.get("retry-after"), json.loads(response.content)["error"]["code"]))
            if len(refusals) == 1:
                requests.delete(f"{stack.base}/api/jobs/{long_job}", headers=header, timeout=10)

    client = openai.OpenAI(base_url=f"{stack.base}/v1", api_key=header["Authorization"].split()[1], max_retries=3,
                           timeout=60, http_client=openai.DefaultHttpxClient(event_hooks={"response": [on_response]}))
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    answer = raw.parse()
    assert answer.choices[0].message.content is not None
    assert refusals and all(refusal == ("1", "too_many_queued") for refusal in refusals)
    assert len(refusals) <= 3
    assert stack.job_row(long_job).status == "cancelled"
    assert stack.job_row(raw.headers["x-request-id"]).status == "succeeded"
