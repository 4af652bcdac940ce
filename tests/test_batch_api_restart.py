"""The Batch API at scale and through a crash, end to end with the ``openai`` package on Postgres: a web killed
while it validates a batch (another web process takes the batch over: nothing lost, nothing doubled), and a file
of 10,000 lines validated and enqueued, then cancelled."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from sqlalchemy import distinct, func, select

from common.models import Job, OpenAIBatch
from devtools import live
from devtools.live import Stack

# Two minutes of restarts and 10,000 lines: a soak, run by `make faults` (not by `make test`).
pytestmark = [pytest.mark.slow, pytest.mark.soak]

FINAL = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Stack]:
    """A deployment whose batch leases lapse after 2 s (a dead validator is replaced quickly)."""
    with live.running_stack("postgres", tmp_path_factory.mktemp("batch-restart"), data_dir, "w-restart",
                            VLGATE_BATCH_LEASE_S="2", VLGATE_BATCH_KEEPER_INTERVAL_S="0.2") as deployment:
        yield deployment


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=2, timeout=60)


def text_lines(count: int) -> bytes:
    """A batch file of short text-only requests of one token each (what a CPU worker gets through quickly)."""
    return b"".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "demo", "max_tokens": 1, "temperature": 0,
                                         "messages": [{"role": "user", "content": f"Count to {i}."}]}}).encode()
                    + b"\n" for i in range(count))


def submit(client: openai.OpenAI, data: bytes) -> str:
    source = client.files.create(file=("requests.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id


def wait(client: openai.OpenAI, batch_id: str, until: tuple[str, ...] = FINAL, timeout: float = 120) -> object:
    return live.wait_until(lambda: (b := client.batches.retrieve(batch_id)).status in until and b, timeout, 0.2,
                           f"batch {batch_id} to reach {until}")


def stored(stack: Stack, batch_id: str) -> tuple[str, int, int]:
    """Read the batch's status, its item rows and their distinct positions straight from the database."""
    with stack.db.connect() as conn:
        status = conn.scalar(select(OpenAIBatch.status).where(OpenAIBatch.id == batch_id))
        rows = conn.scalar(select(func.count()).select_from(Job).where(Job.batch_id == batch_id))
        places = conn.scalar(select(func.count(distinct(Job.batch_index))).where(Job.batch_id == batch_id))
    return status or "", rows or 0, places or 0


def test_a_web_killed_while_validating_is_replaced_and_nothing_is_doubled(client: openai.OpenAI,
                                                                          stack: Stack) -> None:
    count = 1500
    batch_id = submit(client, text_lines(count))
    # Kill the web (master and worker, -9) once its validator has stored some items, before it enqueued them.
    live.wait_until(lambda: (s := stored(stack, batch_id))[0] == "validating" and s[1] > 0, 60, 0.005,
                    "the validator to store its first items")
    stack.web.kill()
    status, rows, _ = stored(stack, batch_id)
    assert status == "validating" and 0 < rows < count  # killed half-way: items stored, none enqueued
    stack.web = live.web(stack.web_port, stack.env, stack.log_dir, name="web-restarted").start()
    live.wait_for_web(stack.base)
    done = wait(client, batch_id, timeout=150)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (count, count, 0)
    assert stored(stack, batch_id) == ("completed", count, count)
    with stack.db.connect() as conn:
        assert conn.scalar(select(OpenAIBatch.attempts).where(OpenAIBatch.id == batch_id)) == 2
        assert conn.scalar(select(func.max(Job.attempts)).where(Job.batch_id == batch_id)) == 1  # each ran once
    output = client.files.content(done.output_file_id).text.splitlines()
    assert sorted(json.loads(row)["custom_id"] for row in output) == sorted(f"line-{i}" for i in range(count))


def test_ten_thousand_lines_are_validated_and_enqueued_then_cancelled(client: openai.OpenAI, stack: Stack) -> None:
    count = 10_000
    data = text_lines(count)
    started = time.monotonic()
    batch_id = submit(client, data)
    running = wait(client, batch_id, ("in_progress", *FINAL), timeout=120)
    validated_s = time.monotonic() - started
    assert running.status == "in_progress" and running.request_counts.total == count
    assert stored(stack, batch_id)[1:] == (count, count)
    print(f"\n{count:,} lines ({len(data) / 2**20:.1f} MiB) validated and enqueued in {validated_s:.1f} s")
    assert client.batches.cancel(batch_id).status == "cancelling"
    ended = wait(client, batch_id, timeout=120)
    counts = ended.request_counts
    assert ended.status == "cancelled" and counts.total == count and counts.completed + counts.failed == count
    errors = client.files.content(ended.error_file_id).text.splitlines()
    assert len(errors) == counts.failed and json.loads(errors[-1])["error"]["code"] == "batch_cancelled"
