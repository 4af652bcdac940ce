"""A conversation's turns go to the worker holding its cached prefix, and say how much of the prompt was cached."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import openai
import requests

from devtools.databases import b64_image
from devtools.live import running_stack, wait_for_worker, wait_until


def cached_tokens(body: dict) -> int:
    """Return usage.prompt_tokens_details.cached_tokens of an /api answer."""
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_turns_follow_their_cache_and_fall_back_when_its_worker_is_gone(tmp_path: Path, data_dir: Path):
    with running_stack("sqlite", tmp_path, data_dir, "w1", VLGATE_LIVENESS_TTL_S="2",
                       VLGATE_STALE_QUEUED_S="120") as stack:
        stack.add_worker("w2")
        chat = {"prompt": "What is on this label?", "image": b64_image((200, 120), (20, 90, 160)),
                "temperature": 0, "max_tokens": 6}
        first = requests.post(f"{stack.base}/api/chat", json=chat, timeout=60).json()
        holder = stack.job_row(first["job_id"]).worker_id
        assert cached_tokens(first) == 0
        session = first["session_id"]
        for turn in range(3):
            body = requests.post(f"{stack.base}/api/chat", timeout=60, json={
                "session_id": session, "prompt": f"And detail {turn}?", "temperature": 0, "max_tokens": 6}).json()
            row = stack.job_row(body["job_id"])
            assert (row.worker_hint, row.worker_id) == (holder, holder)
            # Everything before the new question (image included) came from the cache, not computed again.
            assert first["usage"]["prompt_tokens"] < cached_tokens(body) < body["usage"]["prompt_tokens"]

        # The OpenAI way: a stateless client resends the conversation; the cache is found by its content.
        client = openai.OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": [{"type": "text", "text": "Name the colour."}, {
            "type": "image_url", "image_url": {"url": "data:image/png;base64," + b64_image((96, 96), (200, 40, 40))}}]}]
        one = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=6)
        assert one.usage.prompt_tokens_details.cached_tokens == 0
        messages += [{"role": "assistant", "content": one.choices[0].message.content},
                     {"role": "user", "content": "Are you sure?"}]
        two = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=6)
        assert one.usage.prompt_tokens <= two.usage.prompt_tokens_details.cached_tokens < two.usage.prompt_tokens

        # The holder freezes while it still looks alive: the turn is hinted to it, and after the grace the other
        # worker takes it through the task's delayed copy on the shared queue (the reaper's rescue of stale queued
        # jobs is set to 120 s here, beyond the 60 s /api/chat waits, so only that copy can answer in time).
        gone = next(w for w in stack.workers if w.name == holder)
        other = next(w.name for w in stack.workers if w.name != holder)
        os.kill(gone.proc.pid, signal.SIGSTOP)
        try:
            body = requests.post(f"{stack.base}/api/chat", timeout=60, json={
                "session_id": session, "prompt": "Still there?", "temperature": 0, "max_tokens": 6}).json()
        finally:
            os.kill(gone.proc.pid, signal.SIGCONT)
        row = stack.job_row(body["job_id"])
        assert (row.worker_hint, row.worker_id) == (holder, other) and "response" in body

        # That turn's cache is now on the other worker. It stops: the next turn is not held back for it; the
        # first holder, the only worker left, answers from scratch.
        survivor, gone = gone, next(w for w in stack.workers if w.name == other)
        gone.stop()
        wait_until(lambda: not stack.redis_client().exists(f"vlgate:alive:{other}"), 10, 0.2, "the mark to lapse")
        wait_for_worker(stack.base, survivor.name)
        body = requests.post(f"{stack.base}/api/chat", timeout=60, json={
            "session_id": session, "prompt": "Last one?", "temperature": 0, "max_tokens": 6}).json()
        row = stack.job_row(body["job_id"])
        assert (row.worker_hint, row.worker_id) == (None, survivor.name) and "response" in body
        assert cached_tokens(body) == 0
