"""``/v1`` end to end with the official ``openai`` package: gunicorn web, a real worker with the demo model, Redis."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import openai
import pytest
import requests

from devtools import live
from devtools.databases import make_image
from devtools.live import Stack

pytestmark = pytest.mark.slow

IMAGE = make_image((96, 64), (20, 120, 220))
DATA_URL = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
TAG_SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["shoe", "bag", "shirt", "other"]},
        "colour": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 20},
        "on_sale": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["category", "colour", "count", "on_sale", "tags"],
    "additionalProperties": False,
}


class _Images(BaseHTTPRequestHandler):
    """Serve the test PNG at /photo.png (an image host on this machine, allowlisted as localhost)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path != "/photo.png":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(IMAGE)))
        self.end_headers()
        self.wfile.write(IMAGE)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[int]:
    """A local HTTP server with one image; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Stack]:
    """One deployment whose media allowlist names localhost and lets it resolve to loopback."""
    env = {"VLGATE_ALLOWED_MEDIA_DOMAINS": "localhost", "VLGATE_ALLOWED_MEDIA_NETWORKS": "127.0.0.0/8,::1/128"}
    with live.running_stack("sqlite", tmp_path_factory.mktemp("v1"), data_dir, "w-v1", **env) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(text: str = "What is in this picture?", image: str | None = DATA_URL) -> list[dict]:
    content: list[dict] = [{"type": "text", "text": text}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return [{"role": "user", "content": content}]


def test_models_name_the_demo_checkpoint(client: openai.OpenAI):
    models = client.models.list().data
    assert [m.id for m in models] == ["demo"]
    assert "demo" in models[0].owned_by and "random" in models[0].owned_by
    assert client.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_a_completion_is_a_job_like_any_other(client: openai.OpenAI, stack: Stack):
    raw = client.chat.completions.with_raw_response.create(model="demo", messages=ask(), temperature=0, max_tokens=12)
    answer = raw.parse()
    job_id = raw.headers["x-request-id"]
    assert answer.object == "chat.completion" and answer.id == f"chatcmpl-{job_id}" and answer.model == "demo"
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.completion_tokens <= 12
    assert 0 < usage.prompt_tokens_details.image_tokens < usage.prompt_tokens
    job = requests.get(f"{stack.base}/api/jobs/{job_id}", timeout=10).json()
    assert job["status"] == "succeeded" and job["response"] == answer.choices[0].message.content
    row = stack.job_row(job_id)
    assert row.queue == "chat" and row.session_id is None
    assert row.spec["turns"][0]["role"] == "user" and len(row.spec["turns"][0]["image_ids"]) == 1


def test_streamed_deltas_join_to_the_whole_greedy_answer(client: openai.OpenAI):
    whole = client.chat.completions.create(model="demo", messages=ask(), temperature=0, max_completion_tokens=24)
    chunks = list(client.chat.completions.create(model="demo", messages=ask(), temperature=0, max_completion_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_are_generated_together(client: openai.OpenAI):
    answer = client.chat.completions.create(model="demo", messages=ask(), temperature=1.0, seed=5, n=2, max_tokens=16)
    assert [c.index for c in answer.choices] == [0, 1]
    assert all(c.message.content for c in answer.choices)
    assert answer.choices[0].message.content != answer.choices[1].message.content  # seeds 5 and 6
    streamed = list(client.chat.completions.create(model="demo", messages=ask(), temperature=1.0, seed=5, n=2,
                                                   max_tokens=16, stream=True))
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in streamed
                       if c.choices and c.choices[0].index == index)
        assert text == answer.choices[index].message.content
    finished = [c.choices[0].index for c in streamed if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_logprobs_describe_each_generated_token(client: openai.OpenAI):
    answer = client.chat.completions.create(model="demo", messages=ask(), temperature=0, max_tokens=10,
                                            logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert 0 < len(content) <= answer.usage.completion_tokens
    assert b"".join(bytes(t.bytes) for t in content).decode() == answer.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        tops = [t.logprob for t in token.top_logprobs]
        assert tops == sorted(tops, reverse=True) and token.logprob <= tops[0]


def test_history_with_an_assistant_turn_reaches_the_model(client: openai.OpenAI):
    history = [{"role": "system", "content": "You describe products."}, *ask(),
               {"role": "assistant", "content": "A blue square."},
               {"role": "user", "content": "What colour is it?"}]
    long = client.chat.completions.create(model="demo", messages=history, temperature=0, max_tokens=4)
    short = client.chat.completions.create(model="demo", messages=history[-1:], temperature=0, max_tokens=4)
    assert long.usage.prompt_tokens > short.usage.prompt_tokens + long.usage.prompt_tokens_details.image_tokens
    assert short.usage.prompt_tokens_details.image_tokens == 0


def test_image_urls_come_only_from_allowlisted_hosts(client: openai.OpenAI, image_host: int):
    by_url = client.chat.completions.create(model="demo", messages=ask(image=f"http://localhost:{image_host}/photo.png"),
                                            temperature=0, max_tokens=6)
    by_data = client.chat.completions.create(model="demo", messages=ask(), temperature=0, max_tokens=6)
    assert by_url.choices[0].message.content == by_data.choices[0].message.content  # the same picture
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="demo", messages=ask(image=f"http://127.0.0.1:{image_host}/photo.png"))
    assert "127.0.0.1" in refused.value.message
    with pytest.raises(openai.BadRequestError, match="404"):
        client.chat.completions.create(model="demo", messages=ask(image=f"http://localhost:{image_host}/nothing.png"))


def test_detail_low_costs_fewer_image_tokens(client: openai.OpenAI):
    big = "data:image/png;base64," + base64.b64encode(make_image((900, 700), (200, 40, 40))).decode()
    def image_tokens(**options) -> int:
        messages = [{"role": "user", "content": [{"type": "text", "text": "Describe."},
                                                 {"type": "image_url", "image_url": {"url": big, **options}}]}]
        answer = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=1)
        return answer.usage.prompt_tokens_details.image_tokens
    high, low = image_tokens(detail="high"), image_tokens(detail="low")
    assert low < high
    assert image_tokens(max_pixels=300 * 300) < low


@pytest.mark.parametrize("kwargs, error, words", [
    ({"temperature": 3}, openai.BadRequestError, "temperature"),
    ({"max_tokens": 10**6}, openai.BadRequestError, "max_tokens"),
    ({"n": 9}, openai.BadRequestError, "n: must be at most 4"),
    ({"model": "gpt-4o"}, openai.NotFoundError, "gpt-4o"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, openai.BadRequestError, "tools"),
    ({"messages": ask(image="data:image/png;base64,AAAA")}, openai.BadRequestError, "image"),
    ({"messages": ask(image="https://example.com/a.png")}, openai.BadRequestError, "VLGATE_ALLOWED_MEDIA_DOMAINS"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     openai.BadRequestError, "input_audio"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}}}},
     openai.BadRequestError, "response_format"),
])
def test_bad_requests_arrive_as_typed_sdk_errors(client: openai.OpenAI, kwargs, error, words):
    body = {"model": "demo", "messages": ask(), "max_tokens": 4, **kwargs}
    with pytest.raises(error) as caught:
        client.chat.completions.create(**body)
    assert words in caught.value.message
    assert caught.value.body["type"] and "code" in caught.value.body


def test_json_schema_answers_validate(client: openai.OpenAI):
    fmt = {"type": "json_schema", "json_schema": {"name": "tags", "schema": TAG_SCHEMA, "strict": True}}
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda seed: client.chat.completions.create(
            model="demo", messages=ask("Tag this product."), temperature=1.0, seed=seed * 10, n=4, max_tokens=300,
            response_format=fmt), range(5)))
    samples = [c for a in answers for c in a.choices]
    assert len(samples) == 20
    for choice in samples:
        jsonschema.validate(json.loads(choice.message.content), TAG_SCHEMA)
        assert choice.finish_reason == "stop"
    assert max(a.usage.completion_tokens / 4 for a in answers) < 150  # bounded: no loops on whitespace
    # Any object: random weights write long keys, so a finished answer parses and a cut one is an object's start.
    objects = client.chat.completions.create(model="demo", messages=ask(), temperature=1.0, seed=3, n=4,
                                             max_tokens=200, response_format={"type": "json_object"}).choices
    for choice in objects:
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)


def test_constrained_and_free_rows_share_a_batch(client: openai.OpenAI, stack: Stack):
    fmt = {"type": "json_schema", "json_schema": {"name": "tags", "schema": TAG_SCHEMA}}
    def run(constrained: bool):
        extra = ({"response_format": fmt, "max_tokens": 300} if constrained
                 else {"max_tokens": 60, "extra_body": {"min_tokens": 60}})
        return client.chat.completions.with_raw_response.create(
            model="demo", messages=ask(), temperature=1.0, seed=1, **extra)
    with ThreadPoolExecutor(2) as pool:
        raws = list(pool.map(run, [False, True]))
    free, tagged = (r.parse() for r in raws)
    jsonschema.validate(json.loads(tagged.choices[0].message.content), TAG_SCHEMA)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)
    jobs = [requests.get(f"{stack.base}/api/jobs/{r.headers['x-request-id']}", timeout=10).json() for r in raws]
    # The two generations overlapped in time on the one worker: they were rows of the same decode batch.
    assert jobs[0]["started_at"] < jobs[1]["finished_at"] and jobs[1]["started_at"] < jobs[0]["finished_at"]


def test_a_client_that_leaves_a_stream_cancels_its_job(client: openai.OpenAI, stack: Stack):
    raw = client.chat.completions.with_streaming_response.create(
        model="demo", messages=ask(), temperature=0, max_tokens=2048, extra_body={"min_tokens": 2048}, stream=True)
    with raw as response:
        job_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        received = [line for _, line in zip(range(6), lines, strict=False)]
        assert any(line.startswith("data: ") for line in received)
    started = time.monotonic()
    job = stack.poll(job_id, timeout=30)
    assert job["status"] == "cancelled", job
    assert time.monotonic() - started < 10
    assert job["usage"] is None or job["usage"]["completion_tokens"] < 2048
