"""`make run`'s launcher for real: it starts its own Redis, migrates SQLite, runs a Celery worker and
gunicorn, serves the seed's client, and SIGINT stops every process it started."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.conftest import make_image

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 40.0


def _free_ports(count: int) -> list[int]:
    """Return distinct TCP ports that nothing listens on right now."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _listening(port: int) -> bool:
    """Return whether something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    """Return a live, non-zombie process's command line, or '' when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return ""
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return ""


def _descendants(root: int) -> dict[int, str]:
    """Return every live descendant of root (children, grandchildren...) with its command line."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = _cmdline(pid)
                frontier.append(pid)
    return {pid: cmd for pid, cmd in found.items() if cmd}


def _request(url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, dict]:
    """Send a GET (or a JSON POST) and return the status and the decoded JSON body."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _wait_for(check, proc: subprocess.Popen, log: Path, what: str):  # type: ignore[no-untyped-def]
    """Poll check() until it returns something truthy; fail early if run_local exits."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"run_local exited ({proc.returncode}) before {what}:\n{log.read_text()}"
        try:
            result = check()
        except (OSError, ValueError):
            result = None
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"no {what} within {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-5000:]}")


def _start(tmp_path: Path) -> tuple[subprocess.Popen, Path, int, int]:
    """Start run_local on free ports with the demo model; its Redis URL points where nothing listens."""
    web_port, redis_port = _free_ports(2)
    env = {key: value for key, value in os.environ.items() if not key.startswith("VLGATE_")}
    env.update(VLGATE_MODEL="demo", VLGATE_DATA_DIR=str(tmp_path), VLGATE_DEVICE="cpu", VLGATE_HF_OFFLINE="1",
               VLGATE_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
    log = tmp_path / "run_local.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "scripts/run_local.py", "--port", str(web_port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, log, web_port, redis_port


def _cleanup(proc: subprocess.Popen, started: dict[int, str]) -> None:
    """Kill whatever a failed test left running."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid, cmd in started.items():
        if _cmdline(pid) == cmd:  # the same process, not a reused pid
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_run_local_serves_the_seed_client_and_sigint_stops_everything(tmp_path: Path) -> None:
    proc, log, web_port, redis_port = _start(tmp_path)
    base = f"http://127.0.0.1:{web_port}"
    started: dict[int, str] = {}
    try:
        status, health = _wait_for(lambda: _request(f"{base}/api/health", timeout=5), proc, log, "/api/health")
        assert status in (200, 503) and "workers" in health, health

        # The seed's client: one chat call with an image answers 200 with the text in "response".
        image = base64.b64encode(make_image()).decode()
        chat = {"image": image, "prompt": "What colour is this?", "temperature": 0.4, "max_tokens": 8}

        def ask() -> tuple[int, dict] | None:
            """Chat once; None while the worker is still loading (503 model_not_loaded)."""
            reply = _request(f"{base}/api/chat", chat)
            return reply if reply[0] == 200 else None

        status, answer = _wait_for(ask, proc, log, "answer from /api/chat")
        assert isinstance(answer["response"], str) and answer["session_id"], answer

        # Its own Redis, the SQLite file under the data dir with the migrations applied.
        started = _descendants(proc.pid)
        commands = " | ".join(started.values())
        assert any("redis-server" in cmd for cmd in started.values()), commands
        assert any("celery" in cmd and "worker.celery_app:app" in cmd for cmd in started.values()), commands
        assert any("gunicorn" in cmd for cmd in started.values()), commands
        with sqlite3.connect(tmp_path / "vlgate.db") as db:
            assert db.execute("select version_num from alembic_version").fetchall()

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, log.read_text()[-5000:]
        survivors = {pid: cmd for pid, cmd in started.items() if _cmdline(pid) == cmd}
        assert not survivors, f"still running after run_local exited: {survivors}"
        assert not _listening(web_port) and not _listening(redis_port)
        assert "vlgate is serving on" in log.read_text()
    finally:
        _cleanup(proc, started)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_run_local_stops_everything_when_a_child_dies(tmp_path: Path) -> None:
    proc, log, web_port, redis_port = _start(tmp_path)
    started: dict[int, str] = {}
    try:
        _wait_for(lambda: _request(f"http://127.0.0.1:{web_port}/api/health", timeout=5), proc, log, "/api/health")
        started = _descendants(proc.pid)
        worker = next(pid for pid, cmd in started.items() if "worker.celery_app:app" in cmd)
        os.kill(worker, signal.SIGKILL)
        assert proc.wait(timeout=STOP_TIMEOUT_S) != 0, log.read_text()[-5000:]
        assert "worker exited unexpectedly" in log.read_text()
        survivors = {pid: cmd for pid, cmd in started.items() if _cmdline(pid) == cmd}
        assert not survivors, f"still running after run_local exited: {survivors}"
        assert not _listening(web_port) and not _listening(redis_port)
    finally:
        _cleanup(proc, started)
