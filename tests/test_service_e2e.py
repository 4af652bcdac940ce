"""End to end over real HTTP: gunicorn web, a real Celery worker with the demo model, Redis, SQLite/Postgres."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

from common.models import Job, Message
from devtools import live
from devtools.databases import b64_image
from devtools.live import Stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    """A full deployment per database backend (the demo checkpoint is shared through data_dir)."""
    tmp = tmp_path_factory.mktemp(f"stack-{request.param}")
    # One decode row and no chat reserve: a second job waits in the queue while the first generates, so
    # "cancel while queued" does not race the worker admitting it into the running rows.
    with live.running_stack(request.param, tmp, data_dir, f"w1-{request.param}", VLGATE_MAX_BATCH="1",
                            VLGATE_CHAT_RESERVE="0") as deployment:
        yield deployment



def long_job(stack: Stack, **extra) -> str:
    """Submit a job that generates 2048 tokens (min_tokens keeps random weights from stopping early)."""
    body = {"prompt": "Describe every detail.", "image": b64_image(), "temperature": 0, "max_tokens": 2048,
            "min_tokens": 2048, **extra}
    answer = requests.post(f"{stack.base}/api/jobs", json=body, timeout=30)
    assert answer.status_code == 202, answer.text
    return answer.json()["job_id"]


def test_seed_client_flow_with_a_second_turn_that_sees_the_first(stack: Stack):
    first = requests.post(f"{stack.base}/api/chat", json={
        "image": b64_image(), "prompt": "What is in this picture?", "temperature": 0.4, "max_tokens": 384,
    }, timeout=120)
    assert first.status_code == 200, first.text
    one = first.json()
    assert isinstance(one["response"], str) and one["response"]
    assert one["usage"]["completion_tokens"] > 0 and one["session_id"].startswith("sess_")
    second = requests.post(f"{stack.base}/api/chat", json={
        "prompt": "And what colour is it?", "session_id": one["session_id"], "temperature": 0, "max_tokens": 16,
    }, timeout=120)
    assert second.status_code == 200, second.text
    two = second.json()
    assert two["session_id"] == one["session_id"]
    alone = requests.post(f"{stack.base}/api/chat", json={"prompt": "And what colour is it?", "temperature": 0,
                                                         "max_tokens": 16}, timeout=120).json()
    # The second prompt = the first prompt (image tokens and question) + the first answer + the new turn.
    assert two["usage"]["prompt_tokens"] > one["usage"]["prompt_tokens"] + alone["usage"]["prompt_tokens"]
    history = requests.get(f"{stack.base}/api/sessions/{one['session_id']}", timeout=10).json()
    roles = [m["role"] for m in history["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert len(history["messages"][0]["image_ids"]) == 1 and history["messages"][2]["image_ids"] == []
    assert history["messages"][1]["text"] == one["response"]
    row = stack.job_row(two["job_id"])
    assert row.status == "succeeded" and row.response == two["response"] and row.attempts == 1


def test_submit_and_poll(stack: Stack):
    answer = requests.post(f"{stack.base}/api/jobs", json={"prompt": "Describe it.", "image": b64_image(),
                                                          "temperature": 0, "max_tokens": 12}, timeout=30)
    assert answer.status_code == 202
    accepted = answer.json()
    assert answer.headers["Location"].endswith(f"/api/jobs/{accepted['job_id']}")
    assert accepted["links"]["stream"] == f"/ws/jobs/{accepted['job_id']}"
    job = stack.poll(accepted["job_id"])
    assert job["status"] == "succeeded" and job["response"] and job["attempts"] == 1
    assert job["usage"]["completion_tokens"] <= 12
    assert job["created_at"] <= job["started_at"] <= job["first_token_at"] <= job["finished_at"]


def test_cancel_while_running_keeps_partial_text_and_cancel_while_queued_never_runs(stack: Stack):
    running = long_job(stack)
    stack.poll(running, until=("running",), timeout=30)
    live.wait_until(lambda: requests.get(f"{stack.base}/api/jobs/{running}", timeout=5).json()["response"], 30,
                    what="some streamed text")
    queued = long_job(stack)
    assert requests.get(f"{stack.base}/api/jobs/{queued}", timeout=5).json()["status"] == "queued"
    assert requests.delete(f"{stack.base}/api/jobs/{queued}", timeout=10).json()["status"] == "cancelled"
    requests.delete(f"{stack.base}/api/jobs/{running}", timeout=10)
    stopped = stack.poll(running, timeout=30)
    assert stopped["status"] == "cancelled" and stopped["finish_reason"] == "cancelled"
    assert stopped["response"] and 0 < stopped["usage"]["completion_tokens"] < 2048
    # The worker moves on; the cancelled queued job never starts.
    follow = requests.post(f"{stack.base}/api/chat", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
    assert follow.status_code == 200
    never = stack.job_row(queued)
    assert never.status == "cancelled" and never.attempts == 0 and never.started_at is None
    with stack.db.connect() as conn:
        answer = select(Message.text).where(Message.job_id == running, Message.role == "assistant")
        kept = conn.execute(answer).scalars().all()
    assert kept == [stopped["response"]]


def test_kill_9_mid_generation_is_finished_by_another_worker_exactly_once(stack: Stack):
    victim = stack.workers[-1]
    job_id = long_job(stack)
    stack.poll(job_id, until=("running",), timeout=30)
    live.wait_until(lambda: len(requests.get(f"{stack.base}/api/jobs/{job_id}", timeout=5).json()["response"]) > 20,
                    30, what="the job to be mid-generation")
    victim.kill()
    assert stack.job_row(job_id).status == "running"
    stack.add_worker(f"w2-{stack.database_url[:6]}")
    done = stack.poll(job_id, timeout=120)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    assert done["usage"]["completion_tokens"] == 2048
    with stack.db.connect() as conn:
        answers = conn.execute(select(func.count()).select_from(Message).where(
            Message.job_id == job_id, Message.role == "assistant")).scalar()
        stuck = conn.execute(select(func.count()).select_from(Job).where(Job.status == "running")).scalar()
    assert answers == 1 and stuck == 0


def test_restart_web_and_redis_loses_nothing_and_recovers(stack: Stack):
    chat = requests.post(f"{stack.base}/api/chat", json={"prompt": "Remember me.", "image": b64_image(),
                                                        "max_tokens": 8}, timeout=60).json()
    stack.web.stop()
    stack.web = live.web(stack.web_port, stack.env, stack.log_dir, name="web-2").start()
    live.wait_for_web(stack.base)
    assert len(requests.get(f"{stack.base}/api/sessions/{chat['session_id']}", timeout=10).json()["messages"]) == 2
    assert requests.get(f"{stack.base}/api/jobs/{chat['job_id']}", timeout=10).json()["status"] == "succeeded"

    # Freeze the worker, queue a job, then restart Redis (no persistence): the queued task is gone.
    worker = stack.workers[-1]
    assert worker.proc is not None
    os.killpg(worker.proc.pid, signal.SIGSTOP)
    try:
        lost = requests.post(f"{stack.base}/api/jobs", json={"prompt": "after restart", "max_tokens": 6},
                             timeout=30)
        assert lost.status_code == 202, lost.text
        stack.redis.stop()
        stack.redis = live.redis_server(stack.redis_port, stack.log_dir).start()
        live.wait_until(lambda: requests.get(f"{stack.base}/api/health", timeout=5).json()["redis"]["ok"], 30,
                        what="the web to reach the new Redis")
    finally:
        os.killpg(worker.proc.pid, signal.SIGCONT)
    # No manual step: the worker reconnects and its reaper re-enqueues the lost job from the database.
    recovered = stack.poll(lost.json()["job_id"], timeout=120)
    assert recovered["status"] == "succeeded", recovered
    again = requests.post(f"{stack.base}/api/chat", json={"prompt": "still there?", "session_id": chat["session_id"],
                                                         "max_tokens": 4}, timeout=60)
    assert again.status_code == 200, again.text
