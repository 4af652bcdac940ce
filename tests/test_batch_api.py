"""The Batch API end to end with the official ``openai`` package: gunicorn web (its batch keeper), a real worker
with the demo model, Redis, SQLite. Files in, batches run as vlgate jobs, output and error files out."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import requests

from devtools import live
from devtools.databases import make_image
from devtools.live import Stack

pytestmark = pytest.mark.slow

MODEL = "demo"
PHOTO = "data:image/png;base64," + base64.b64encode(make_image((96, 64), (20, 120, 220))).decode()
NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"these bytes are not a picture").decode()
FINAL = ("completed", "failed", "expired", "cancelled")
SCHEMA = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}},
          "required": ["colour"], "additionalProperties": False}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Stack]:
    """One deployment that also accepts a 3-second completion window (to see batches expire)."""
    with live.running_stack("sqlite", tmp_path_factory.mktemp("batch-api"), data_dir, "w-batch",
                            VLGATE_BATCH_WINDOWS="24h,3s", VLGATE_BATCH_KEEPER_INTERVAL_S="0.2") as deployment:
        yield deployment


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=0, timeout=60)


def request_line(custom_id: str, content: Any = "Describe the picture.", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **body}}


def with_image(url: str, text: str = "What colour is it?") -> list[dict[str, Any]]:
    return [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]


def submit(client: openai.OpenAI, lines: list[Any], window: str = "24h", **extra: Any) -> Any:
    data = b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)
    source = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert source.bytes == len(data) and source.purpose == "batch"
    return client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                 completion_window=window, **extra)


def wait(client: openai.OpenAI, batch_id: str, until: tuple[str, ...] = FINAL, timeout: float = 90) -> Any:
    return live.wait_until(lambda: (b := client.batches.retrieve(batch_id)).status in until and b, timeout, 0.2,
                           f"batch {batch_id} to reach {until}")


def lines_of(client: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    return {row["custom_id"]: row for row in map(json.loads, client.files.content(file_id).text.splitlines())}


def test_a_batch_of_images_runs_and_its_files_join_by_custom_id(client: openai.OpenAI, stack: Stack) -> None:
    lines = [
        request_line("photo", with_image(PHOTO), temperature=0),
        request_line("json", with_image(PHOTO, "Name its colour as JSON."),
                     response_format={"type": "json_schema", "json_schema": {"name": "tag", "schema": SCHEMA}},
                     max_tokens=40),
        request_line("two", "Say something.", n=2, temperature=1),
        request_line("logprobs", "Say something.", logprobs=True, top_logprobs=2),
        request_line("bad-image", with_image(NOT_AN_IMAGE)),
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": MODEL, "max_completion_tokens": 8, "messages": [
             {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello"},
             {"role": "assistant", "content": "Hi."}, {"role": "user", "content": with_image(PHOTO)}]}},
    ]
    made = submit(client, lines, metadata={"run": "e2e"})
    assert made.status == "validating" and made.metadata == {"run": "e2e"} and made.endpoint == "/v1/chat/completions"
    done = wait(client, made.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (6, 5, 1)
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    output, errors = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
    assert set(output) == {"photo", "json", "two", "logprobs", "chat"} and set(errors) == {"bad-image"}
    for custom_id, row in output.items():
        assert row["response"]["status_code"] == 200 and row["error"] is None, custom_id
        assert row["response"]["body"]["object"] == "chat.completion"
    jsonschema.validate(json.loads(output["json"]["response"]["body"]["choices"][0]["message"]["content"]), SCHEMA)
    assert len(output["two"]["response"]["body"]["choices"]) == 2
    assert output["logprobs"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    failure = errors["bad-image"]["response"]
    assert failure["status_code"] == 400 and failure["body"]["error"]["code"] == "invalid_image"
    # Every line is a vlgate job on the batch queue, in the vlgate batch of the same id.
    job = requests.get(f"{stack.base}/api/jobs/{output['photo']['response']['request_id']}", timeout=10).json()
    assert job["status"] == "succeeded"
    assert stack.job_row(job["job_id"]).queue == "batch"
    vlgate = requests.get(f"{stack.base}/api/batches/{made.id}", timeout=10).json()
    assert vlgate["total"] == 6 and vlgate["counts"]["succeeded"] == 5 and vlgate["counts"]["failed"] == 1
    assert requests.get(f"{stack.base}/batch", params={"batch": made.id}, timeout=10).status_code == 200
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_structural_errors_fail_the_batch_with_line_numbers(client: openai.OpenAI) -> None:
    lines = [request_line("a", "Hi"), b'{"custom_id": "b", "method": "POST",', request_line("a", "Hi"),
             request_line("c", "Hi", model="gpt-4o"), {**request_line("d", "Hi"), "url": "/v1/completions"},
             request_line("e", "Hi", max_tokens=0)]
    failed = wait(client, submit(client, lines).id)
    assert failed.status == "failed" and failed.failed_at and failed.output_file_id is None
    assert [(e.line, e.code) for e in failed.errors.data] == [
        (2, "invalid_json_line"), (3, "duplicate_custom_id"), (4, "model_mismatch"), (5, "url_mismatch"),
        (6, "invalid_request")]
    assert failed.errors.data[4].param == "body.max_tokens"


def test_batches_list_pages_through_every_batch(client: openai.OpenAI) -> None:
    made = [submit(client, [request_line("x", "Hi", max_tokens=1)]).id for _ in range(5)]
    pages = list(client.batches.list(limit=2).iter_pages())
    assert len(pages) >= 3 and all(len(page.data) <= 2 for page in pages)
    listed = [b.id for b in client.batches.list(limit=2)]  # the SDK's auto-pagination
    assert listed[:5] == made[::-1] and len(listed) == len(set(listed))
    for batch_id in made:
        wait(client, batch_id)


def test_cancel_ends_with_what_finished(client: openai.OpenAI) -> None:
    made = submit(client, [request_line(f"r{i}", "Tell me a long story.", max_tokens=32) for i in range(150)])
    wait(client, made.id, ("in_progress",))
    cancelling = client.batches.cancel(made.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    ended = wait(client, made.id)
    assert ended.status == "cancelled" and ended.cancelled_at
    counts = ended.request_counts
    assert counts.total == 150 and counts.completed + counts.failed == 150 and counts.failed > 0
    output, errors = lines_of(client, ended.output_file_id), lines_of(client, ended.error_file_id)
    assert len(output) == counts.completed and len(errors) == counts.failed and not set(output) & set(errors)
    assert {row["error"]["code"] for row in errors.values()} == {"batch_cancelled"}
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(wait(client, submit(client, [request_line("z", "Hi", max_tokens=1)]).id).id)


def test_a_batch_expires_when_its_window_passes(client: openai.OpenAI) -> None:
    # Far more work than 3 s can hold on any machine (150 x 1,000 tokens): the window, not the work, ends it.
    made = submit(client, [request_line(f"r{i}", "Tell me a long story.", max_tokens=1000, min_tokens=1000)
                           for i in range(150)], window="3s")
    ended = wait(client, made.id)
    assert ended.status == "expired" and ended.expired_at and ended.expires_at - ended.created_at == 3
    counts = ended.request_counts
    assert counts.total == 150 and counts.completed + counts.failed == 150 and counts.failed > 0
    errors = lines_of(client, ended.error_file_id)
    assert len(errors) == counts.failed and {row["error"]["code"] for row in errors.values()} == {"batch_expired"}
    assert len(lines_of(client, ended.output_file_id)) == counts.completed


def test_files_are_listed_read_and_deleted(client: openai.OpenAI) -> None:
    source = client.files.create(file=("notes.jsonl", b'{"x": 1}\n'), purpose="batch")
    assert source.id in [f.id for f in client.files.list(purpose="batch")]
    assert client.files.content(source.id).content == b'{"x": 1}\n'
    assert client.files.delete(source.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(source.id)
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
