"""The private stack bench.service and the benches built on it measure (Redis, gunicorn web, one Celery worker),
the request they send, and the model shape (``--shape``) the worker and the in-process engine load."""

from __future__ import annotations

import base64
import math
from pathlib import Path

import requests

from common.config import Settings
from devtools import live
from devtools.databases import fresh_database, make_image

PROMPT = "Describe this picture."
IMAGE_PNG = make_image((96, 64), (20, 120, 220))
IMAGE_B64 = base64.b64encode(IMAGE_PNG).decode()
# Production values: the tests' short leases and reaper intervals would add database writes to every job.
PRODUCTION = {"VLGATE_JOB_LEASE_S": "30", "VLGATE_REAPER_INTERVAL_S": "10", "VLGATE_STALE_QUEUED_S": "60"}
SHAPES = ("demo", "mid")
SHAPE_HELP = ("demo: the tiny test checkpoint (~1-2 ms per decode step on one CPU thread); mid: 36 layers x 256 "
              "wide, random weights, whose CPU step (~20-30 ms) matches Qwen3-VL-4B's on a GPU (worker/shapes.py)")


def shape_settings(shape: str, data_dir: Path | None) -> Settings:
    """Return CPU settings whose ``model`` is the shape's checkpoint ("demo", or the built mid directory)."""
    from worker.shapes import ensure_shaped_checkpoint

    given = {"data_dir": data_dir} if data_dir else {}
    settings = Settings(model="demo", device="cpu", hf_offline=True, **given)
    if shape == "demo":
        return settings
    path = ensure_shaped_checkpoint(settings.demo_dir, shape).resolve()
    return Settings(model=str(path), device="cpu", hf_offline=True, **given)


def pct(values: list[float], q: float) -> float:
    """Return the nearest-rank percentile ``q`` (0-100) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def table(headers: list[str], rows: list[list[str]]) -> None:
    """Print a left-aligned first column and right-aligned numbers under a header line."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for line in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))))


class Stack:
    """A private Redis, the gunicorn web and one Celery worker over a fresh database migrated by Alembic.

    ``model`` is VLGATE_MODEL ("demo" or a checkpoint directory). ``metrics`` off sets VLGATE_METRICS_PORT=0 (the
    worker records nothing and serves no /metrics); the web's counters are always on.
    """

    def __init__(self, data_dir: Path, tmp: Path, database: str, metrics: bool = True, model: str = "demo",
                 web_processes: int = 1) -> None:
        self.databases = fresh_database(database, tmp)
        self.database_url = next(self.databases)
        redis_port, port = live.free_port(), live.free_port()
        self.metrics_port = live.free_port() if metrics else None
        self.base = f"http://127.0.0.1:{port}"
        env = live.stack_env(self.database_url, f"redis://127.0.0.1:{redis_port}/0", data_dir.resolve(),
                             VLGATE_METRICS_PORT=str(self.metrics_port or 0), **PRODUCTION, VLGATE_MODEL=model)
        self.tmp, self.workers_started = tmp, 1
        self.services = [live.redis_server(redis_port, tmp), live.web(port, env, tmp, processes=web_processes),
                         live.worker("bench-w1", env, tmp)]
        self.worker_info: dict = {}

    @property
    def worker_id(self) -> str:
        return f"bench-w{self.workers_started}"

    def start(self) -> None:
        """Start every process and wait until the worker has its model loaded."""
        for service in self.services:
            service.start()
        live.wait_for_web(self.base)
        self.wait_for_worker()

    def wait_for_worker(self) -> None:
        """Wait until the current worker has its model loaded."""
        self.worker_info = live.wait_for_worker(self.base, self.worker_id, timeout=120)

    def replace_worker(self, metrics: bool) -> None:
        """Stop the worker and start a fresh one with worker metrics on or off; then call ``wait_for_worker``."""
        old = self.services[-1]
        old.stop()
        self.metrics_port = live.free_port() if metrics else None
        self.workers_started += 1
        env = {**old.env, "VLGATE_METRICS_PORT": str(self.metrics_port or 0)}  # keeps a subclass's settings
        self.services[-1] = live.worker(self.worker_id, env, self.tmp).start()

    def stop(self) -> None:
        """Stop the processes, newest first, then drop the database."""
        for service in reversed(self.services):
            service.stop()
        next(self.databases, None)

    def generation_tokens_counted(self) -> float:
        """Return the worker's vllm:generation_tokens_total from its /metrics (0 when metrics are off)."""
        if self.metrics_port is None:
            return 0
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vllm:generation_tokens_total{"))
