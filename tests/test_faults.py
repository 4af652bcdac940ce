"""The standing fault proof, on SQLite and Postgres with real processes: kill -9 a worker at random moments,
restart Redis mid-generation and mid-queue, drop every database connection, kill the web mid-upload. Every job
reaches a final state with no manual step: 0 lost, 0 answered twice, 0 stuck; health recovers.

``make test`` runs a bounded round; ``make faults`` runs the same proof longer (VLGATE_FAULT_SCALE).
"""

from __future__ import annotations

import base64
import os
import random
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, func, select, text

from common.models import Batch, Job, Message
from devtools import live
from devtools.databases import make_image
from devtools.live import Stack
from web.services.batches import FLUSH_ITEMS

pytestmark = pytest.mark.slow

SCALE = max(1, int(os.environ.get("VLGATE_FAULT_SCALE", "1")))  # make faults: 10
IMAGE = base64.b64encode(make_image((64, 48), (90, 30, 160))).decode()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp(f"faults-{request.param}")
    env = {"VLGATE_UPLOAD_ABANDON_S": "2", "VLGATE_LIVENESS_TTL_S": "2", "VLGATE_SERVICE_WAIT_S": "60"}
    with live.running_stack(request.param, tmp, data_dir, f"f1-{request.param}", **env) as deployment:
        yield deployment


def submit(stack: Stack, count: int, tokens: int) -> list[str]:
    """Submit `count` jobs that each generate exactly `tokens` tokens."""
    ids = []
    for i in range(count):
        body = {"prompt": f"Describe item {i}.", "image": IMAGE, "temperature": 0, "max_tokens": tokens,
                "min_tokens": tokens}
        answer = requests.post(f"{stack.base}/api/jobs", json=body, timeout=30)
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["job_id"])
    return ids


def tally(stack: Stack, job_ids: list[str], timeout: float) -> dict[str, int]:
    """Wait until every job is final; count lost, doubled and stuck ones (all must be 0)."""
    def all_final() -> bool:
        with stack.db.connect() as conn:
            open_jobs = conn.execute(select(func.count()).select_from(Job).where(
                Job.id.in_(job_ids), Job.status.in_(("queued", "running")))).scalar()
        return open_jobs == 0

    started = time.monotonic()
    live.wait_until(all_final, timeout, 0.25, "every job to reach a final state")
    with stack.db.connect() as conn:
        statuses = dict(conn.execute(select(Job.id, Job.status).where(Job.id.in_(job_ids))).all())
        answers = dict(conn.execute(select(Message.job_id, func.count()).where(
            Message.job_id.in_(job_ids), Message.role == "assistant").group_by(Message.job_id)).all())
        attempts = conn.execute(select(func.max(Job.attempts)).where(Job.id.in_(job_ids))).scalar()
    counts = {
        "jobs": len(job_ids),
        "succeeded": sum(s == "succeeded" for s in statuses.values()),
        "lost": sum(j not in statuses or (statuses[j] == "succeeded" and answers.get(j, 0) == 0) for j in job_ids),
        "answered twice": sum(n > 1 for n in answers.values()),
        "stuck": sum(s in ("queued", "running") for s in statuses.values()),
        "max attempts": attempts or 0,
        "settled in s": round(time.monotonic() - started, 1),
    }
    print(f"\nfault tally ({stack.database_url.split(':')[0]}): {counts}")
    return counts


def healthy(stack: Stack) -> dict:
    """Return the health report once a worker serves again (state idle or busy, model loaded)."""
    def ready() -> dict | None:
        report = requests.get(f"{stack.base}/api/health", timeout=5).json()
        serving = [w for w in report["workers"] if w["loaded"] and w["state"] in ("idle", "busy")]
        return report if report["model_ready"] and serving else None

    return live.wait_until(ready, 60, 0.25, "health to recover")


def running(stack: Stack, job_ids: list[str]) -> int:
    """Count the jobs being generated right now."""
    with stack.db.connect() as conn:
        return conn.execute(select(func.count()).select_from(Job).where(
            Job.id.in_(job_ids), Job.status == "running")).scalar() or 0


def test_kill_9_at_random_moments_loses_and_doubles_nothing(stack: Stack):
    rng = random.Random(7)
    job_ids = submit(stack, 10 * SCALE, 384)
    for round_no in range(2 * SCALE):
        live.wait_until(lambda: running(stack, job_ids), 60, 0.05, "jobs to be generating")
        time.sleep(rng.uniform(0.1, 1.0))  # a random moment mid-generation
        victim = stack.workers[-1]
        victim.kill()
        killed = time.monotonic()
        live.wait_until(lambda gone=victim.name: gone not in [w["worker_id"] for w in requests.get(
            f"{stack.base}/api/health", timeout=5).json()["workers"]], 10, 0.1, "health to drop the dead worker")
        print(f"\nhealth dropped the killed worker after {time.monotonic() - killed:.1f} s")
        stack.add_worker(f"f{round_no + 2}-{secrets.token_hex(2)}")
    counts = tally(stack, job_ids, timeout=120 * SCALE)
    assert counts["lost"] == counts["answered twice"] == counts["stuck"] == 0, counts
    assert 2 <= counts["max attempts"] <= 3  # the kills hit jobs mid-generation, and each was re-run
    with stack.db.connect() as conn:
        failed = conn.execute(select(Job.error_code, Job.attempts).where(
            Job.id.in_(job_ids), Job.status != "succeeded")).all()
    # Only a job whose worker died under it on all of its attempts may fail, and it says so.
    assert all(code == "worker_lost" and attempts == 3 for code, attempts in failed), failed
    if SCALE == 1:
        assert counts["succeeded"] == counts["jobs"], counts


def test_redis_restart_mid_generation_and_mid_queue(stack: Stack):
    # More jobs than one decode batch holds: some are generating, the rest wait in the queue.
    job_ids = submit(stack, 12 * SCALE, 96)
    live.wait_until(lambda: len(requests.get(f"{stack.base}/api/jobs/{job_ids[0]}", timeout=5).json()
                                ["response"] or "") > 10, 30, what="generation to be under way")
    for _ in range(SCALE):
        stack.redis.stop()
        time.sleep(3.5)
        stack.redis = live.redis_server(stack.redis_port, stack.log_dir).start()
        time.sleep(1.0)
    restarted = time.monotonic()
    counts = tally(stack, job_ids, timeout=150 * SCALE)
    assert counts["lost"] == counts["answered twice"] == counts["stuck"] == 0, counts
    assert counts["succeeded"] == counts["jobs"], counts
    report = healthy(stack)
    assert not [w for w in report["workers"] if w["state"] == "error"], report["workers"]
    assert "infrastructure fault" in stack.workers[-1].log_path.read_text()  # the blip hit jobs in flight
    print(f"health serving again {time.monotonic() - restarted:.1f} s after the restart")
    again = requests.post(f"{stack.base}/api/chat", json={"prompt": "still there?", "max_tokens": 4}, timeout=60)
    assert again.status_code == 200, again.text


def test_dropped_database_connections_strand_nothing(stack: Stack):
    if not stack.database_url.startswith("postgresql"):
        pytest.skip("SQLite has no server connections to drop")
    job_ids = submit(stack, 8 * SCALE, 64)
    name = stack.database_url.rsplit("/", 1)[1]
    admin = create_engine(stack.database_url.rsplit("/", 1)[0] + "/test", isolation_level="AUTOCOMMIT")
    try:
        for _ in range(2 * SCALE):
            time.sleep(0.8)
            with admin.connect() as conn:  # what a Postgres restart does to every client
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": name})
    finally:
        admin.dispose()
    counts = tally(stack, job_ids, timeout=120 * SCALE)
    assert counts["lost"] == counts["answered twice"] == counts["stuck"] == 0, counts
    assert counts["succeeded"] == counts["jobs"], counts
    healthy(stack)


def _slow_upload(stack: Stack, files: int, sent: threading.Event) -> None:
    """Stream a multipart upload of small images, a little at a time (the web is killed part way through)."""
    boundary = "faultboundary"

    def body() -> Iterator[bytes]:
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nTag it.\r\n").encode()
        for i in range(files):
            yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{i}.png\"\r\n"
                   "Content-Type: image/png\r\n\r\n").encode() + make_image((32, 32), (i, 9, 9)) + b"\r\n"
            if i == FLUSH_ITEMS + 50:  # past the writer's first transaction: rows exist
                sent.set()
            time.sleep(0.01)
        yield f"--{boundary}--\r\n".encode()

    try:
        requests.post(f"{stack.base}/api/batches", data=body(), timeout=60,
                      headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    except requests.RequestException:
        pass  # the web died under it: that is the point


def test_a_web_killed_mid_upload_runs_none_of_it_and_leaves_nothing(stack: Stack):
    sent = threading.Event()
    uploader = threading.Thread(target=_slow_upload, args=(stack, 5000, sent), daemon=True)
    uploader.start()
    assert sent.wait(30)

    def partial_batches() -> list[str]:
        with stack.db.connect() as conn:
            return list(conn.execute(select(Batch.id).where(Batch.total == 0)).scalars())

    partial = live.wait_until(partial_batches, 30, 0.05, "the upload's first items to be written")
    time.sleep(0.5)  # workers get every chance to take what was written
    stack.web.kill()
    with stack.db.connect() as conn:
        claimed = conn.execute(select(func.count()).select_from(Job).where(
            Job.batch_id.in_(partial), Job.status != "queued")).scalar()
        written = conn.execute(select(func.count()).select_from(Job).where(Job.batch_id.in_(partial))).scalar()
    assert written >= FLUSH_ITEMS and claimed == 0  # items were written; no worker touched the incomplete upload
    stack.web = live.web(stack.web_port, stack.env, stack.log_dir, name=f"web-{secrets.token_hex(2)}").start()
    live.wait_for_web(stack.base)
    uploader.join(60)

    def cleaned() -> bool:
        with stack.db.connect() as conn:
            return not conn.execute(select(Batch.id).where(Batch.id.in_(partial))).first()

    live.wait_until(cleaned, 30, 0.25, "the reaper to remove the abandoned upload")
    with stack.db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Job).where(Job.batch_id.in_(partial))).scalar() == 0


def test_errors_gunicorn_gives_itself_are_json(stack: Stack):
    answer = requests.get(f"{stack.base}/api/jobs/{'x' * 10_000}", timeout=10)
    assert answer.status_code == 414 and answer.headers["Content-Type"] == "application/json"
    assert answer.json()["error"]["code"] == "uri_too_long"
