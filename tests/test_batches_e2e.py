"""Bulk batches through the whole service with a real worker: order, failures, cancel, chat first, batching."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
import requests
from PIL import Image

from devtools import live
from devtools.databases import make_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    with live.running_stack("sqlite", tmp_path_factory.mktemp("batches"), data_dir, "batch-w1") as deployment:
        yield deployment


def b64(size=(64, 48), color=(10, 20, 30)) -> str:
    return base64.b64encode(make_image(size, color)).decode()


def wait_batch(stack: live.Stack, batch_id: str, timeout: float = 180) -> dict:
    """Poll a batch until every item is final."""
    def done() -> dict | None:
        body = requests.get(f"{stack.base}/api/batches/{batch_id}", timeout=10).json()
        return body if body["status"] != "running" else None

    return live.wait_until(done, timeout, 0.2, f"batch {batch_id} to finish")


def results(stack: live.Stack, batch_id: str, fmt: str = "json") -> list[dict]:
    answer = requests.get(f"{stack.base}/api/batches/{batch_id}/results", params={"format": fmt}, timeout=30)
    assert answer.status_code == 200, answer.text
    if fmt == "jsonl":
        return [json.loads(line) for line in answer.text.splitlines() if line]
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(answer.content.decode("utf-8-sig"))))  # CSV starts with a BOM
    return answer.json()["results"]


def test_seed_batch_of_five_answers_in_input_order(stack: live.Stack):
    items = [{"image": b64(color=(40 * i, 80, 120)), "prompt": f"Item {i}?", "max_tokens": 6} for i in range(5)]
    answer = requests.post(f"{stack.base}/api/batch", json=items, timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["batch_id"].startswith("batch_")
    assert [r["index"] for r in body["results"]] == list(range(5))
    assert all(r["status"] == "succeeded" and r["response"] for r in body["results"])
    # Every item is a job too.
    job = requests.get(f"{stack.base}/api/jobs/{body['results'][2]['job_id']}", timeout=10).json()
    assert job["batch_id"] == body["batch_id"] and job["session_id"] is None


def test_bulk_upload_of_200_with_3_corrupt_images(stack: live.Stack):
    corrupt = {17: b"not an image at all", 101: make_image((40, 40))[:60], 150: b"\x89PNG\r\n\x1a\n" + b"\0" * 40}
    files = []
    for i in range(200):
        data = corrupt.get(i) or make_image((32 + i % 7, 32), (i % 256, (3 * i) % 256, 90))
        files.append(("files", (f"img_{i:03d}.png", data, "image/png")))
    form = {"prompt": "Tag this photo.", "max_tokens": "4", "temperature": "0"}
    answer = requests.post(f"{stack.base}/api/batches", data=form, files=files, timeout=120)
    assert answer.status_code == 202, answer.text
    batch = wait_batch(stack, answer.json()["batch_id"])
    assert batch["counts"]["succeeded"] == 197 and batch["counts"]["failed"] == 3 and batch["total"] == 200
    for rows in (results(stack, batch["batch_id"]), results(stack, batch["batch_id"], "jsonl")):
        assert [r["name"] for r in rows] == [f"img_{i:03d}.png" for i in range(200)]
        assert [i for i, r in enumerate(rows) if r["status"] == "failed"] == sorted(corrupt)
        assert all(rows[i]["error"]["code"] == "invalid_image" for i in corrupt)
    table = results(stack, batch["batch_id"], "csv")
    assert [int(r["index"]) for r in table] == list(range(200))
    assert {table[i]["error_code"] for i in corrupt} == {"invalid_image"}
    assert all(table[i]["status"] == "succeeded" for i in range(200) if i not in corrupt)


def test_cancel_mid_batch_stops_what_has_not_run(stack: live.Stack):
    items = [{"prompt": f"Long answer {i}", "max_tokens": 300, "min_tokens": 300} for i in range(40)]
    batch_id = requests.post(f"{stack.base}/api/batches", json={"items": items}, timeout=60).json()["batch_id"]
    live.wait_until(lambda: requests.get(f"{stack.base}/api/batches/{batch_id}", timeout=10)
                    .json()["counts"]["succeeded"] >= 1, 60, what="the first items to finish")
    requests.delete(f"{stack.base}/api/batches/{batch_id}", timeout=30)
    final = wait_batch(stack, batch_id, timeout=60)
    counts = final["counts"]
    assert final["status"] == "cancelled" and counts["queued"] == counts["running"] == 0
    assert counts["succeeded"] >= 1 and counts["cancelled"] >= 20
    assert counts["succeeded"] + counts["cancelled"] == 40


def test_chat_submitted_behind_50_batch_items_starts_next(stack: live.Stack):
    items = [{"prompt": f"Describe {i}", "max_tokens": 48, "min_tokens": 48} for i in range(50)]
    batch_id = requests.post(f"{stack.base}/api/batches", json={"items": items}, timeout=60).json()["batch_id"]
    live.wait_until(lambda: requests.get(f"{stack.base}/api/batches/{batch_id}", timeout=10)
                    .json()["counts"]["running"] > 0, 30, what="the batch to start")
    chat = requests.post(f"{stack.base}/api/chat", json={"prompt": "Quick question", "max_tokens": 4},
                         timeout=120).json()
    job = requests.get(f"{stack.base}/api/jobs/{chat['job_id']}", timeout=10).json()
    wait_batch(stack, batch_id)
    item_jobs = [requests.get(f"{stack.base}/api/jobs/{r['job_id']}", timeout=10).json()
                 for r in results(stack, batch_id)]
    # Items still waiting when the chat arrived all started after it: the chat jumped the queue.
    waiting = [j for j in item_jobs if j["started_at"] > job["created_at"]]
    assert len(waiting) >= 10
    assert all(job["started_at"] <= j["started_at"] for j in waiting)
    assert job["timings"]["queue_ms"] < 2000


def test_batched_greedy_equals_unbatched_greedy_through_the_service(stack: live.Stack):
    sizes = [(64, 48), (320, 200), (256, 512), (100, 100), (48, 300), (200, 64), (128, 128), (400, 300)]
    items = []
    for i, size in enumerate(sizes):
        buffer = io.BytesIO()
        Image.new("RGB", size, (30 * i, 255 - 30 * i, 60)).save(buffer, format="PNG")
        items.append({"image": base64.b64encode(buffer.getvalue()).decode(), "prompt": f"Describe item {i}.",
                      "temperature": 0, "max_tokens": 24})
    together = requests.post(f"{stack.base}/api/batch", json=items, timeout=120).json()["results"]
    jobs = [requests.get(f"{stack.base}/api/jobs/{r['job_id']}", timeout=10).json() for r in together]
    assert max(j["attempts"] for j in jobs) == 1
    first_done = min(j["finished_at"] for j in jobs)
    assert sum(j["started_at"] < first_done for j in jobs) >= 4  # they really ran in one batch
    for item, batched in zip(items, together, strict=True):
        alone = requests.post(f"{stack.base}/api/chat", json=item, timeout=120).json()
        assert alone["response"] == batched["response"]
