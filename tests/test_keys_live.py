"""Keys on a real deployment (gunicorn web, Celery worker with the demo model, Redis, SQLite), as clients meet
them: the official ``openai`` package on ``/v1``, raw header bytes that no Python client would send, and a
key revoked from outside the web processes.

No ``/v1`` route takes a tenant's id (``/v1/models/<id>`` names the served model), so on ``/v1`` isolation
means: a completion is a job of the caller's tenant, which another tenant cannot read through ``/api``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests
from sqlalchemy.orm import Session

from common.keys import create_key, prefix_of, revoke_key
from devtools import live
from devtools.live import Stack

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Stack]:
    """A deployment started open (no key yet, loopback), as `make run` starts."""
    with live.running_stack("sqlite", tmp_path_factory.mktemp("keys"), data_dir, "w-keys") as deployment:
        yield deployment


def new_key(stack: Stack, name: str, **options: object) -> str:
    """Make a key in the deployment's database, as `keys create` would, and return its secret."""
    with Session(stack.db) as db:
        return create_key(db, name, **options).secret  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def keys(stack: Stack) -> dict[str, str]:
    """Keys of tenants a and b and an admin; once they exist the running web requires keys within a second."""
    assert requests.get(f"{stack.base}/v1/models", timeout=10).status_code == 200  # open until now
    made = {"a": new_key(stack, "team-a"), "b": new_key(stack, "team-b"), "admin": new_key(stack, "ops", admin=True)}
    live.wait_until(lambda: requests.get(f"{stack.base}/v1/models", timeout=10).status_code == 401, 3, 0.05,
                    "keys to be required")
    return made


def sdk(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base}/v1", api_key=key, max_retries=0, timeout=120)


def test_a_wrong_key_is_an_authentication_error(stack: Stack, keys: dict[str, str]) -> None:
    for wrong in ("unused", keys["a"] + "x", "vlg_12345678_" + "a" * 43):
        with pytest.raises(openai.AuthenticationError) as info:
            sdk(stack, wrong).models.list()
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        assert info.value.body["type"] == "authentication_error" and wrong not in str(info.value.body)
        with pytest.raises(openai.AuthenticationError):
            sdk(stack, wrong).chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2)


def test_the_right_key_works_and_its_completion_is_its_tenants(stack: Stack, keys: dict[str, str]) -> None:
    client = sdk(stack, keys["a"])
    assert [m.id for m in client.models.list().data] == ["demo"]
    raw = client.chat.completions.with_raw_response.create(model="demo", messages=MESSAGES, temperature=0,
                                                           max_tokens=4)
    job_id = raw.headers["x-request-id"]
    assert raw.parse().id == f"chatcmpl-{job_id}" and raw.parse().choices[0].message.content
    row = stack.job_row(job_id)
    assert row.tenant == "team-a" and row.key_id is not None
    url = f"{stack.base}/api/jobs/{job_id}"
    their = requests.get(url, headers={"Authorization": f"Bearer {keys['b']}"}, timeout=10)
    assert their.status_code == 404 and their.json()["error"]["code"] == "job_not_found"
    assert requests.delete(url, headers={"X-API-Key": keys["b"]}, timeout=10).status_code == 404
    for who in ("a", "admin"):
        seen = requests.get(url, headers={"X-API-Key": keys[who]}, timeout=10)
        assert seen.status_code == 200 and seen.json()["status"] == "succeeded"
    assert stack.job_row(job_id).cancel_requested is False


def raw_request(stack: Stack, header: bytes) -> tuple[int, bytes]:
    """Send one GET with a header line of any bytes; return the status and the body."""
    port = int(stack.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /api/jobs/job_000000000000000000000000 HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header
                     + b"\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("header", [
    "Authorization: Bearer vlg_12345678_ключ-секрет-ключ-секрет-ключ-секрет".encode(),
    "X-API-Key: vlg_12345678_🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑".encode(),
    b"X-API-Key: vlg_12345678_\xff\xfe\xc3\x28" + b"a" * 40,
    b"Authorization: Bearer " + b"A" * 7_000,
    b"Authorization: Bearer " + b"A" * 20_000,
    b"X-API-Key: vlg_\x01\x02_abc",
])
def test_hostile_header_bytes_are_refused_never_500(stack: Stack, keys: dict[str, str], header: bytes) -> None:
    status, body = raw_request(stack, header)
    assert status in (400, 401, 431), (status, body[:300])
    assert body.startswith(b'{"error"'), body[:300]


def test_a_key_revoked_from_the_command_line_is_refused_within_a_second(stack: Stack, keys: dict[str, str]) -> None:
    secret = new_key(stack, "short-lived")
    client = sdk(stack, secret)
    live.wait_until(lambda: client.models.list().data, 3, 0.05, "the new key to work")
    with Session(stack.db) as db:
        revoke_key(db, prefix_of(secret) or "")
    revoked_at = time.monotonic()
    with pytest.raises(openai.AuthenticationError) as info:
        while time.monotonic() - revoked_at < 1.5:
            client.models.list()
            time.sleep(0.02)
    assert info.value.code == "key_revoked" and "was revoked" in info.value.message
