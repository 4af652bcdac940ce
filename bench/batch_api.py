"""Measure the OpenAI Batch API on a private stack with the demo model: upload speed, validation and enqueue speed
and the web's peak memory meanwhile (a 10,000-line file of small images), and end-to-end items/s of a /v1 batch
against the same items sent through ``POST /api/batches``."""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import openai
import requests

from common.config import Settings
from devtools import live
from devtools.databases import fresh_database, make_image

PROMPT = "What colour is this?"
PRODUCTION = {"VLGATE_JOB_LEASE_S": "30", "VLGATE_REAPER_INTERVAL_S": "10", "VLGATE_STALE_QUEUED_S": "60"}
MIB = 1024 * 1024


def image(i: int) -> bytes:
    """A small PNG of its own colour per line (images are stored once by content: identical ones would cheat)."""
    return make_image((64, 48), (i % 256, (i // 256) % 256, 90 + i % 7))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def batch_file(count: int, offset: int = 0) -> bytes:
    """A /v1 batch input file of ``count`` one-token requests, each with its own small image."""
    rows = []
    for i in range(offset, offset + count):
        content = [{"type": "text", "text": PROMPT},
                   {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(image(i))}}]
        rows.append(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "demo", "max_tokens": 1, "temperature": 0,
                                         "messages": [{"role": "user", "content": content}]}}))
    return ("\n".join(rows) + "\n").encode()


def rss_of_tree(root: int) -> int:
    """Return the resident memory of a process and its descendants (bytes), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    total = 0
    for pid in tree:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


class PeakRss(threading.Thread):
    """Sample a process tree's resident memory every 50 ms; keep the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stopping = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.05):
            self.peak = max(self.peak, rss_of_tree(self.pid))

    def stop(self) -> int:
        self.stopping.set()
        self.join()
        return self.peak


@dataclass
class Report:
    """What one run measured."""

    lines: int
    file_mib: float
    upload_s: float
    validate_s: float
    rss_before_mib: float
    rss_peak_mib: float
    e2e_items: int
    v1_e2e_s: float
    api_e2e_s: float

    @property
    def upload_mib_s(self) -> float:
        return self.file_mib / self.upload_s

    @property
    def validate_lines_s(self) -> float:
        return self.lines / self.validate_s


@contextlib.contextmanager
def running_stack(data_dir: Path, database: str) -> Iterator[tuple[str, live.Service]]:
    """A private Redis, the gunicorn web (one worker process) and one Celery worker; yields the URL and the web."""
    with tempfile.TemporaryDirectory(prefix="vlgate-bench-") as tmp:
        databases = fresh_database(database, Path(tmp))
        url = next(databases)
        redis_port, port = live.free_port(), live.free_port()
        env = live.stack_env(url, f"redis://127.0.0.1:{redis_port}/0", data_dir.resolve(), VLGATE_METRICS_PORT="0",
                             **PRODUCTION)
        services = [live.redis_server(redis_port, Path(tmp)), live.web(port, env, Path(tmp)),
                    live.worker("bench-batch", env, Path(tmp))]
        try:
            for service in services:
                service.start()
            base = f"http://127.0.0.1:{port}"
            live.wait_for_web(base)
            live.wait_for_worker(base, "bench-batch", timeout=180)
            yield base, services[1]
        finally:
            for service in reversed(services):
                service.stop()
            next(databases, None)


def poll(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait until ``check()``; return the seconds it took."""
    started = time.perf_counter()
    live.wait_until(check, timeout, 0.05, what)
    return time.perf_counter() - started


def run_benchmark(data_dir: Path, database: str, lines: int, e2e_items: int) -> Report:
    """Upload and validate ``lines`` lines (then cancel them), and run ``e2e_items`` items both ways."""
    data = batch_file(lines)
    with running_stack(data_dir, database) as (base, web):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
        assert web.proc is not None
        before = rss_of_tree(web.proc.pid)
        peak = PeakRss(web.proc.pid)
        peak.start()
        started = time.perf_counter()
        source = client.files.create(file=("bench.jsonl", data), purpose="batch")
        upload_s = time.perf_counter() - started
        made = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
        validate_s = poll(lambda: client.batches.retrieve(made.id).status != "validating", 1800, "validation")
        rss_peak = peak.stop()
        status = client.batches.retrieve(made.id).status
        assert status == "in_progress", f"the batch is {status}, not in_progress"
        client.batches.cancel(made.id)
        poll(lambda: client.batches.retrieve(made.id).status == "cancelled", 600, "the cancellation")
        # End to end, the same items both ways (the second set of images is new to the server too).
        small = client.files.create(file=("e2e.jsonl", batch_file(e2e_items, offset=lines)), purpose="batch")
        started = time.perf_counter()
        run = client.batches.create(input_file_id=small.id, endpoint="/v1/chat/completions", completion_window="24h")
        poll(lambda: client.batches.retrieve(run.id).status == "completed", 3600, "the /v1 batch")
        v1_s = time.perf_counter() - started
        items = [{"prompt": PROMPT, "image": b64(image(i)), "max_tokens": 1, "temperature": 0}
                 for i in range(lines + e2e_items, lines + 2 * e2e_items)]
        started = time.perf_counter()
        accepted = requests.post(f"{base}/api/batches", json={"items": items}, timeout=600).json()
        poll(lambda: requests.get(f"{base}/api/batches/{accepted['batch_id']}", timeout=30).json()["status"]
             != "running", 3600, "the /api batch")
        api_s = time.perf_counter() - started
    return Report(lines=lines, file_mib=len(data) / MIB, upload_s=upload_s, validate_s=validate_s,
                  rss_before_mib=before / MIB, rss_peak_mib=rss_peak / MIB, e2e_items=e2e_items, v1_e2e_s=v1_s,
                  api_e2e_s=api_s)


def print_report(report: Report) -> None:
    """Print what was measured."""
    print(f"Batch API, {report.lines:,} lines with a small image each ({report.file_mib:.1f} MiB)")
    print(f"  upload (files.create)          {report.upload_mib_s:8.1f} MiB/s   ({report.upload_s:.2f} s)")
    print(f"  validation + enqueue           {report.validate_lines_s:8.0f} lines/s ({report.validate_s:.2f} s)")
    print(f"  web RSS (gunicorn, all procs)  {report.rss_before_mib:8.0f} MiB before, "
          f"{report.rss_peak_mib:.0f} MiB peak during upload and validation")
    print(f"End to end, {report.e2e_items:,} items (max_tokens 1), demo model on this machine's worker")
    print(f"  /v1/batches (file, validate, run, finish)   {report.e2e_items / report.v1_e2e_s:6.1f} items/s "
          f"({report.v1_e2e_s:.1f} s)")
    print(f"  POST /api/batches (JSON items, run)         {report.e2e_items / report.api_e2e_s:6.1f} items/s "
          f"({report.api_e2e_s:.1f} s)")


@click.command()
@click.option("--lines", type=int, default=10_000, show_default=True, help="Lines of the uploaded and validated file.")
@click.option("--e2e-items", type=int, default=500, show_default=True, help="Items run to the end each way.")
@click.option("--database", type=click.Choice(["sqlite", "postgres"]), default="sqlite", show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Data dir with the demo checkpoint.")
def main(lines: int, e2e_items: int, database: str, data_dir: Path | None) -> None:
    """Run the Batch API benchmark on a private stack and print the figures."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM tears the stack down like Ctrl-C
    settings = Settings(model="demo", **({"data_dir": data_dir} if data_dir else {}))  # the demo checkpoint's home
    print_report(run_benchmark(settings.data_dir, database, lines, e2e_items))


if __name__ == "__main__":
    main()
