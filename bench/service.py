"""Measure the service: a chat job end to end versus in process, and job acceptance throughput, per model shape."""

from __future__ import annotations

import io
import os
import signal
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click
import requests
import torch
from PIL import Image

from bench.service_metrics import (  # noqa: F401 - re-exported: other benches and tests import them from here
    MetricsCost,
    compare_metrics,
    print_metrics_cost,
    run_metrics_compare,
    two_stacks,
)
from bench.service_stack import (  # noqa: F401 - re-exported
    IMAGE_B64,
    IMAGE_PNG,
    PRODUCTION,
    PROMPT,
    SHAPE_HELP,
    SHAPES,
    Stack,
    pct,
    shape_settings,
    table,
)
from worker.engine import Engine, GenerationRequest, Turn
from worker.sampling import SamplingParams

# A chat job's life, cut by the client's clock and the job's reported timings (epoch seconds, same host).
PHASES = ["HTTP in -> job row created", "job created -> generation start (commit, Celery, claim, load, prepare)",
          "generation in the worker", "generation end -> client has the reply (store, notify, HTTP)"]


@dataclass
class Latency:
    """Per-iteration milliseconds of the HTTP path, the in-process call, and the phases of each."""

    e2e_ms: list[float] = field(default_factory=list)
    inproc_ms: list[float] = field(default_factory=list)
    inproc_generation_ms: list[float] = field(default_factory=list)
    inproc_step_ms: list[float] = field(default_factory=list)  # in-process decode step (first token to last)
    phases_ms: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})

    @property
    def overhead_ms(self) -> list[float]:
        """Return e2e minus in-process, iteration by iteration."""
        return [e - i for e, i in zip(self.e2e_ms, self.inproc_ms, strict=True)]


@dataclass
class Acceptance:
    """Latencies of ``POST /api/jobs`` under concurrent clients, their wall time, and what became of the jobs."""

    clients: int
    wall_s: float
    latencies_ms: list[float]
    accepted: int
    cancelled: int


def measure_latency(stack: Stack, engine: Engine, count: int, warmup: int, tokens: int) -> Latency:
    """Alternate one chat over HTTP with the same generate in process, so drift hits both alike."""
    body = {"prompt": PROMPT, "image": IMAGE_B64, "temperature": 0, "max_tokens": tokens, "min_tokens": tokens,
            "wait": 120}
    params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens)
    out = Latency()
    with requests.Session() as http:
        for i in range(warmup + count):
            sent, start = time.time(), time.perf_counter()
            answer = http.post(f"{stack.base}/api/chat", json=body, timeout=180)
            e2e, received = time.perf_counter() - start, time.time()
            if answer.status_code != 200 or answer.json()["usage"]["completion_tokens"] != tokens:
                raise RuntimeError(f"chat {i}: HTTP {answer.status_code}: {answer.text[:300]}")
            start = time.perf_counter()
            image = Image.open(io.BytesIO(IMAGE_PNG)).convert("RGB")  # the worker decodes its stored PNG too
            [result] = engine.generate([GenerationRequest(f"inproc{i}", [Turn("user", PROMPT, [image])], params)])
            inproc = time.perf_counter() - start
            if result.completion_tokens != tokens:
                raise RuntimeError(f"in process {i}: {result.finish_reason}: {result.error_message}")
            if i < warmup:
                continue
            t = answer.json()["timings"]
            out.e2e_ms.append(e2e * 1e3)
            out.inproc_ms.append(inproc * 1e3)
            out.inproc_generation_ms.append(result.timings["generation_ms"])
            out.inproc_step_ms.append(1e3 / result.timings["decode_tokens_per_s"])
            spans = [t["queued_at"] - sent, t["started_at"] - t["queued_at"], t["finished_at"] - t["started_at"],
                     received - t["finished_at"]]
            for phase, span in zip(PHASES, spans, strict=True):
                out.phases_ms[phase].append(span * 1e3)
    return out


def measure_acceptance(stack: Stack, submits: int, clients: int, tokens: int) -> Acceptance:
    """POST ``submits`` jobs from ``clients`` threads (a Session each), then cancel the ones not yet run."""
    body = {"prompt": PROMPT, "image": IMAGE_B64, "temperature": 0, "max_tokens": tokens, "min_tokens": tokens}
    local = threading.local()

    def call(method: str, path: str, **kwargs: object) -> tuple[float, requests.Response]:
        """Send one request on this thread's session; return its milliseconds and the response."""
        if not hasattr(local, "http"):
            local.http = requests.Session()
        start = time.perf_counter()
        answer = local.http.request(method, f"{stack.base}{path}", timeout=60, **kwargs)
        return (time.perf_counter() - start) * 1e3, answer

    pool = ThreadPoolExecutor(clients)
    try:
        list(pool.map(lambda _: call("GET", "/api/health"), range(clients * 4)))  # connect every thread first
        start = time.perf_counter()
        posted = list(pool.map(lambda _: call("POST", "/api/jobs", json=body), range(submits)))
        wall = time.perf_counter() - start
        ids = [r.json()["job_id"] for _, r in posted if r.status_code == 202]
        gone = list(pool.map(lambda job: call("DELETE", f"/api/jobs/{job}")[1], ids))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    cancelled = sum(r.ok and r.json().get("status") == "cancelled" for r in gone)
    return Acceptance(clients, wall, [ms for ms, _ in posted], len(ids), cancelled)


def run_benchmark(engine: Engine, data_dir: Path, count: int, warmup: int, tokens: int, submits: int,
                  clients: int, database: str = "sqlite", model: str = "demo", web_processes: int = 1
                  ) -> tuple[dict[str, str], Latency, Acceptance]:
    """Start a private stack, measure latency then acceptance, and always tear the stack down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker runs with OMP_NUM_THREADS=1: compare like with like
    with tempfile.TemporaryDirectory(prefix="vlgate-bench-") as tmp:
        stack = Stack(data_dir, Path(tmp), database, model=model, web_processes=web_processes)
        try:
            stack.start()
            latency = measure_latency(stack, engine, count, warmup, tokens)
            acceptance = measure_acceptance(stack, submits, clients, tokens)
        finally:
            stack.stop()
            torch.set_num_threads(threads)
    argv = stack.services[1].argv
    header = {
        "model": f"{engine.info.label} [worker: {stack.worker_info.get('model_label')}]",
        "device": f"{engine.info.device} {engine.info.dtype}; torch threads 1 in worker and in process; "
                  f"{os.cpu_count()} CPU cores shared by all processes",
        "database": f"{database}, fresh, Alembic head: {stack.database_url.split('@')[-1]}",
        "web": f"gunicorn -k gthread, {argv[argv.index('-w') + 1]} worker x {argv[argv.index('--threads') + 1]} "
               "threads; private redis-server; 1 Celery worker (solo pool, prefetch 1, late acks)"}
    return header, latency, acceptance


def print_report(header: dict[str, str], lat: Latency, acc: Acceptance, tokens: int) -> None:
    """Print the header and the tables."""
    for key, value in header.items():
        print(f"{key + ':':10}{value}")

    def row(name: str, values: list[float]) -> list[str]:
        return [name, f"{statistics.median(values):.1f}", f"{pct(values, 95):.1f}", f"{statistics.mean(values):.1f}"]

    print(f"\n1. One chat job, {len(lat.e2e_ms)} iterations after warmup: {tokens} tokens greedy (min_tokens = "
          "max_tokens), one 96x64 PNG, a new session each; ms")
    table(["path", "median", "p95", "mean"], [
        row("e2e: POST /api/chat -> DB -> Celery -> worker -> DB -> reply", lat.e2e_ms),
        row("in process: engine.generate, same prompt, image and params", lat.inproc_ms),
        row("overhead: e2e - in process, per iteration", lat.overhead_ms)])
    prepare = [a - b for a, b in zip(lat.inproc_ms, lat.inproc_generation_ms, strict=True)]
    print("\nWhere the e2e time goes (client clock + the job's reported timings); ms")
    table(["phase", "median", "p95", "mean"], [row(p, v) for p, v in lat.phases_ms.items()] + [
        row("for reference, in process: decode + prepare (processor)", prepare),
        row("for reference, in process: generation", lat.inproc_generation_ms)])
    print(f"\n2. Job acceptance: {len(acc.latencies_ms)} x POST /api/jobs from {acc.clients} clients (same body: "
          "image stored once); the worker consumes meanwhile; the rest are cancelled after")
    table(["clients", "accepted", "jobs/s", "POST p50 ms", "POST p95 ms", "cancelled while queued"],
          [[str(acc.clients), f"{acc.accepted}/{len(acc.latencies_ms)}", f"{acc.accepted / acc.wall_s:.1f}",
            f"{pct(acc.latencies_ms, 50):.1f}", f"{pct(acc.latencies_ms, 95):.1f}", str(acc.cancelled)]])


def print_shapes(results: dict[str, Latency]) -> None:
    """Print one line per shape: its decode step, e2e and in-process medians, and the e2e/in-process ratio."""
    print("\nShapes side by side (one chat job; target: e2e / in process <= 1.3x); ms, medians")
    table(["shape", "in-process decode step", "e2e", "in process", "overhead", "e2e / in process"],
          [[shape, f"{statistics.median(lat.inproc_step_ms):.1f}", f"{statistics.median(lat.e2e_ms):.1f}",
            f"{statistics.median(lat.inproc_ms):.1f}", f"{statistics.median(lat.overhead_ms):.1f}",
            f"{statistics.median(lat.e2e_ms) / statistics.median(lat.inproc_ms):.2f}x"]
           for shape, lat in results.items()])


@click.command()
@click.option("--shape", type=click.Choice([*SHAPES, "both"]), default="demo", show_default=True, help=SHAPE_HELP)
@click.option("--requests", "count", type=int, default=30, show_default=True, help="Measured chat iterations.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Unmeasured iterations first.")
@click.option("--tokens", type=int, default=16, show_default=True, help="max_tokens = min_tokens per job.")
@click.option("--submits", type=int, default=200, show_default=True, help="Jobs submitted for acceptance.")
@click.option("--clients", type=int, default=8, show_default=True, help="Concurrent submitting clients.")
@click.option("--database", type=click.Choice(["sqlite", "postgres"]), default="sqlite", show_default=True)
@click.option("--web-processes", type=int, default=1, show_default=True,
              help="gunicorn worker processes of the web (docker/web.sh runs 2).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Data dir with the demo checkpoint.")
@click.option("--metrics-compare", is_flag=True, help="Instead: chat latency with worker metrics on vs off, as a "
              "ratio (two stacks, rounds alternating; --requests chats per side per round; demo shape).")
@click.option("--rounds", type=int, default=8, show_default=True, help="Rounds of --metrics-compare.")
def main(shape: str, count: int, warmup: int, tokens: int, submits: int, clients: int, database: str,
         web_processes: int, data_dir: Path | None, metrics_compare: bool, rounds: int) -> None:
    """Print end-to-end versus in-process latency and job acceptance throughput of one private stack per shape."""
    from transformers.utils import logging as hf_logging

    from worker.loader import load_engine

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM tears the stack down like Ctrl-C
    hf_logging.disable_progress_bar()
    if metrics_compare:
        settings = shape_settings("demo", data_dir)
        load_engine(settings)  # builds the demo checkpoint first, so the workers find it ready
        print_metrics_cost(run_metrics_compare(settings.data_dir, rounds, count, warmup, tokens, database))
        return
    results = {}
    for name in SHAPES if shape == "both" else (shape,):
        settings = shape_settings(name, data_dir)  # builds the checkpoint first, so the worker finds it ready
        engine = load_engine(settings)
        print(f"\n=== shape {name} ===")
        header, results[name], acceptance = run_benchmark(engine, settings.data_dir, count, warmup, tokens, submits,
                                                          clients, database, settings.model, web_processes)
        print_report(header, results[name], acceptance, tokens)
    print_shapes(results)


if __name__ == "__main__":
    main()
