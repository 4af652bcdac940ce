"""The token stream over WebSockets with a real worker: every follower gets the whole text exactly once."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import redis
import requests
from simple_websocket import Client, ConnectionClosed

from common.bus import job_channel
from devtools import live
from devtools.databases import b64_image
from tests.socketfixtures import close, read_stream, receive

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    """One deployment (Postgres, as in production) shared by the protocol tests."""
    with live.running_stack("postgres", tmp_path_factory.mktemp("stream"), data_dir, "ws-w1") as deployment:
        yield deployment


def ws_url(stack: live.Stack, path: str) -> str:
    return stack.base.replace("http://", "ws://") + path





def assert_exactly_once(tokens: list[dict], final: dict, text: str) -> None:
    """Sequence numbers only grow, and the deltas join to the final text."""
    seqs = [t["seq"] for t in tokens] + [final["seq"]]
    assert seqs == sorted(set(seqs)), seqs
    assert "".join(t["text"] for t in tokens) == final["response"] == text


def submit_long(stack: live.Stack) -> str:
    body = {"prompt": "Tell me everything.", "image": b64_image(), "temperature": 0, "max_tokens": 2048,
            "min_tokens": 2048}
    return requests.post(f"{stack.base}/api/jobs", json=body, timeout=30).json()["job_id"]


def stored_answer(stack: live.Stack, session_id: str) -> str:
    messages = requests.get(f"{stack.base}/api/sessions/{session_id}", timeout=10).json()["messages"]
    return messages[-1]["text"] if messages and messages[-1]["role"] == "assistant" else ""


def test_chat_socket_tokens_join_to_done_and_stored_message_over_several_turns(stack: live.Stack):
    ws = Client.connect(ws_url(stack, "/ws/chat"))
    try:
        ws.send(json.dumps({"type": "chat", "prompt": "What is this?", "image": b64_image(), "max_tokens": 40,
                            "temperature": 0.7, "seed": 1}))
        accepted = receive(ws)
        assert accepted["type"] == "accepted" and accepted["job_id"].startswith("job_")
        tokens, done = read_stream(ws)
        assert done["type"] == "done" and done["status"] == "succeeded" and done["job_id"] == accepted["job_id"]
        assert all(t["job_id"] == accepted["job_id"] for t in tokens) and len(tokens) > 1
        assert_exactly_once(tokens, done, stored_answer(stack, accepted["session_id"]))
        # Bad input is an error frame; the socket stays usable for the next turn of the same session.
        ws.send(json.dumps({"type": "chat", "prompt": "hi", "temperature": 5}))
        error = receive(ws)
        assert error["type"] == "error" and error["code"] == "invalid_request" and "temperature" in error["message"]
        assert error["error"] == {"code": "invalid_request", "message": error["message"]}
        ws.send(json.dumps({"type": "chat", "prompt": "And then?", "session_id": accepted["session_id"],
                            "max_tokens": 8}))
        second = receive(ws)
        assert second["type"] == "accepted" and second["session_id"] == accepted["session_id"]
        tokens, done = read_stream(ws)
        assert_exactly_once(tokens, done, stored_answer(stack, accepted["session_id"]))
    finally:
        close(ws)


def test_followers_joining_before_during_and_after_each_get_the_whole_text_once(stack: live.Stack):
    job_id = submit_long(stack)
    early = middle = resumed = Client.connect(ws_url(stack, f"/ws/jobs/{job_id}"))
    twin = Client.connect(ws_url(stack, f"/ws/jobs/{job_id}"))  # two sockets on one job
    try:
        seen, _ = read_stream(early, limit=40)
        middle = Client.connect(ws_url(stack, f"/ws/jobs/{job_id}"))
        resumed = Client.connect(ws_url(stack, f"/ws/jobs/{job_id}?after={seen[19]['seq']}"))
        early_tokens, early_done = read_stream(early, seen)
        results = [read_stream(ws) for ws in (twin, middle, resumed)]
    finally:
        close(early, twin, middle, resumed)
    text = requests.get(f"{stack.base}/api/jobs/{job_id}", timeout=10).json()["response"]
    assert early_done["status"] == "succeeded" and len(text) > 100
    assert_exactly_once(early_tokens, early_done, text)
    for tokens, done in results[:2]:
        assert_exactly_once(tokens, done, text)
    resumed_tokens, resumed_done = results[2]
    head = "".join(t["text"] for t in seen[:20])
    assert head + "".join(t["text"] for t in resumed_tokens) == text
    assert all(t["seq"] > seen[19]["seq"] for t in resumed_tokens)
    late = Client.connect(ws_url(stack, f"/ws/jobs/{job_id}"))
    tokens, done = read_stream(late)
    assert_exactly_once(tokens, done, text)
    with pytest.raises(ConnectionClosed):  # the job socket closes after the final event
        late.receive(timeout=10)


def test_cancel_over_the_socket_keeps_partial_text(stack: live.Stack):
    ws = Client.connect(ws_url(stack, "/ws/chat"))
    try:
        ws.send(json.dumps({"type": "chat", "prompt": "Go on forever.", "max_tokens": 2048, "min_tokens": 2048,
                            "temperature": 0}))
        accepted = receive(ws)
        tokens, _ = read_stream(ws, limit=10)
        ws.send(json.dumps({"type": "cancel", "job_id": accepted["job_id"]}))
        tokens, done = read_stream(ws, tokens)
    finally:
        close(ws)
    assert done["type"] == "done" and done["status"] == "cancelled" and done["finish_reason"] == "cancelled"
    assert 10 <= done["usage"]["completion_tokens"] < 2048
    assert_exactly_once(tokens, done, stored_answer(stack, accepted["session_id"]))


def test_abrupt_disconnect_costs_only_the_subscription(stack: live.Stack):
    ws = Client.connect(ws_url(stack, "/ws/chat"))
    ws.send(json.dumps({"type": "chat", "prompt": "Keep going.", "max_tokens": 600, "min_tokens": 600,
                        "temperature": 0}))
    accepted = receive(ws)
    read_stream(ws, limit=5)
    ws.sock.shutdown(socket.SHUT_RDWR)  # no close frame: the browser tab simply vanished
    ws.sock.close()
    job = stack.poll(accepted["job_id"], timeout=60)
    assert job["status"] == "succeeded" and job["usage"]["completion_tokens"] == 600
    assert stored_answer(stack, accepted["session_id"]) == job["response"]
    client = redis.Redis(port=stack.redis_port)
    live.wait_until(lambda: client.pubsub_numsub(job_channel(accepted["job_id"]))[0][1] == 0, 10,
                    what="the web to drop the subscription")
    assert requests.get(f"{stack.base}/api/health", timeout=5).status_code == 200


def test_unknown_job_socket_answers_job_not_found(stack: live.Stack):
    ws = Client.connect(ws_url(stack, "/ws/jobs/job_000000000000000000000000"))
    event = receive(ws, 10)
    assert event["type"] == "error" and event["code"] == "job_not_found"


def test_a_turn_that_asked_for_it_is_cancelled_when_its_socket_goes(stack: live.Stack):
    ws = Client.connect(ws_url(stack, "/ws/chat"))
    ws.send(json.dumps({"type": "chat", "prompt": "Keep going.", "max_tokens": 2048, "min_tokens": 2048,
                        "temperature": 0, "cancel_on_disconnect": True}))
    accepted = receive(ws)
    read_stream(ws, limit=5)
    ws.sock.shutdown(socket.SHUT_RDWR)
    ws.sock.close()
    job = stack.poll(accepted["job_id"], timeout=30)
    assert job["status"] == "cancelled" and 5 <= job["usage"]["completion_tokens"] < 2048


def test_hostile_frames_get_error_frames_and_the_socket_lives_on(stack: live.Stack):
    ws = Client.connect(ws_url(stack, "/ws/chat"))
    try:
        ws.send("[" * 5000 + "]" * 5000)
        assert receive(ws, 10)["code"] == "invalid_json"
        ws.send(json.dumps({"type": "chat", "prompt": "a\u0000b"}))
        nul = receive(ws, 10)
        assert nul["type"] == "error" and nul["code"] == "invalid_request" and "NUL" in nul["message"]
        ws.send(json.dumps({"type": "chat", "prompt": "hi", "cancel_on_disconnect": "yes"}))
        assert "cancel_on_disconnect" in receive(ws, 10)["message"]
        ws.send(json.dumps({"type": "ping"}))
        assert receive(ws, 10) == {"type": "pong"}
    finally:
        close(ws)
