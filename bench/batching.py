"""Measure continuous batching through the service, per model shape: many concurrent jobs versus the engine's own
batches of the same size and one at a time in process, and chat time-to-first-token while a large batch runs."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import requests
import torch

from bench import engine as engine_bench
from bench import service
from bench.service import IMAGE_B64, PROMPT, SHAPE_HELP, SHAPES, pct, shape_settings, table
from bench.stream import chat, chat_socket
from common.config import Settings
from devtools import live
from worker.engine import Engine, GenerationRequest


class Stack(service.Stack):
    """bench.service's private stack (production lease/reaper timings) with the scheduler's batch sizes set."""

    def __init__(self, data_dir: Path, tmp: Path, database: str, max_batch: int, chat_reserve: int,
                 metrics: bool = True, model: str = "demo") -> None:
        super().__init__(data_dir, tmp, database, metrics, model)
        for process in self.services[1:]:  # web and worker; redis keeps its own environment
            process.env.update(VLGATE_MAX_BATCH=str(max_batch), VLGATE_CHAT_RESERVE=str(chat_reserve))


@dataclass
class Throughput:
    """Items and generated tokens over the wall time of one run, and how many jobs generated at once on average."""

    label: str
    items: int
    wall_s: float
    tokens: int
    overlap: float

    @property
    def items_per_s(self) -> float:
        return self.items / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


@dataclass
class Ttft:
    """Per chat turn, ms: client send -> first token frame, and the worker's queue_ms and time_to_first_token_ms."""

    client_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)
    worker_ms: list[float] = field(default_factory=list)


@contextlib.contextmanager
def running(data_dir: Path, database: str, max_batch: int, chat_reserve: int, model: str = "demo") -> Iterator[Stack]:
    """Start a private stack in a temporary directory; always stop it."""
    with tempfile.TemporaryDirectory(prefix="vlgate-bench-") as tmp:
        stack = Stack(data_dir, Path(tmp), database, max_batch, chat_reserve, model=model)
        try:
            stack.start()
            yield stack
        finally:
            stack.stop()


def median(runs: list[Throughput]) -> Throughput:
    """Return the run with the median wall time."""
    return sorted(runs, key=lambda r: r.wall_s)[len(runs) // 2]


def overlap(spans: list[tuple[float, float]]) -> float:
    """Return the mean number of (start, end) spans in progress over the union of their time."""
    return sum(b - a for a, b in spans) / (max(b for _, b in spans) - min(a for a, _ in spans))


def item(request: GenerationRequest, tokens: int) -> dict:
    """Turn an engine request (one user turn, one image) into a batch item with the same prompt, image and params."""
    turn, png = request.messages[0], io.BytesIO()
    turn.images[0].save(png, format="PNG")
    return {"name": request.request_id, "prompt": turn.text, "image": base64.b64encode(png.getvalue()).decode(),
            "temperature": 0, "max_tokens": tokens, "min_tokens": tokens}


def in_process(engine: Engine, reqs: list[GenerationRequest], tokens: int, batch: int = 1) -> Throughput:
    """``engine.generate`` on ``batch`` requests at a time (1: the tutorial's way), with the worker's one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker runs with OMP_NUM_THREADS=1: compare like with like
    try:
        engine.generate(engine_bench.make_requests(2, 4, "warm"))  # one-off allocator and processor costs
        chunks = [reqs[i:i + batch] for i in range(0, len(reqs), batch)]
        tps = engine_bench._tokens_per_s(engine, chunks, tokens)  # fails on any short row
    finally:
        torch.set_num_threads(threads)
    made = len(reqs) * tokens
    label = ("in process, engine.generate([r]) one at a time" if batch == 1 else
             f"in process, engine.generate in batches of {batch}")
    return Throughput(label, len(reqs), made / tps, made, float(min(batch, len(reqs))))


def post_batch(http: requests.Session, stack: Stack, items: list[dict]) -> str:
    answer = http.post(f"{stack.base}/api/batches", json={"items": items}, timeout=300)
    if answer.status_code != 202:
        raise RuntimeError(f"POST /api/batches: HTTP {answer.status_code}: {answer.text[:300]}")
    return answer.json()["batch_id"]


def batch_state(http: requests.Session, stack: Stack, batch: str) -> dict:
    return http.get(f"{stack.base}/api/batches/{batch}", timeout=30).json()


def through_service(http: requests.Session, stack: Stack, items: list[dict], tokens: int, label: str) -> Throughput:
    """POST all items as one batch; poll until every item is final; check each and read its timings."""
    start = time.perf_counter()
    batch = post_batch(http, stack, items)
    live.wait_until(lambda: batch_state(http, stack, batch)["status"] != "running", 1800, 0.05, f"batch {batch}")
    wall = time.perf_counter() - start
    results = http.get(f"{stack.base}/api/batches/{batch}/results", timeout=60).json()["results"]
    bad = [r for r in results if r["status"] != "succeeded" or r["usage"]["completion_tokens"] != tokens]
    if bad or len(results) != len(items):
        raise RuntimeError(f"batch {batch}: {len(bad)} bad of {len(results)} items, first: {bad[:1]}")
    timings = [http.get(f"{stack.base}/api/jobs/{r['job_id']}", timeout=30).json()["timings"] for r in results]
    spans = [(t["started_at"], t["finished_at"]) for t in timings]
    return Throughput(label, len(items), wall, sum(r["usage"]["completion_tokens"] for r in results), overlap(spans))


def chats(stack: Stack, count: int, tokens: int, gap_s: float) -> Ttft:
    """Run ``count`` chat turns on one /ws/chat socket, each after the previous one is done plus ``gap_s``."""
    out = Ttft()
    with chat_socket(stack) as ws:
        for _ in range(count):
            turn = chat(ws, tokens)
            timings = turn.done["timings"]
            out.client_ms.append((turn.tokens[0][2] - turn.sent) * 1e3)
            out.queue_ms.append(timings["queue_ms"])
            out.worker_ms.append(timings["time_to_first_token_ms"])
            time.sleep(gap_s)
    return out


def under_batch(http: requests.Session, stack: Stack, size: int, tokens: int, count: int, chat_tokens: int,
                gap_s: float, rows: int) -> tuple[Ttft, dict]:
    """Start a ``size``-item batch, wait until it fills the batch rows, run the chats, then cancel the batch;
    return the chats' times and the batch's counts before and after them, and its status after."""
    items = [{"name": f"bulk{i}", "prompt": PROMPT, "image": IMAGE_B64, "temperature": 0, "max_tokens": tokens,
              "min_tokens": tokens} for i in range(size)]
    batch = post_batch(http, stack, items)
    try:
        live.wait_until(lambda: batch_state(http, stack, batch)["counts"]["running"] >= min(rows, size), 120, 0.05,
                        "the batch to fill the worker's rows")
        before = batch_state(http, stack, batch)["counts"]
        busy = chats(stack, count, chat_tokens, gap_s)
        after = batch_state(http, stack, batch)
    finally:
        http.delete(f"{stack.base}/api/batches/{batch}", timeout=60)
    return busy, {"before": before, "after": after["counts"], "status": after["status"]}


def run_benchmark(engine: Engine, data_dir: Path, jobs: int, tokens: int, batch_items: int, batch_tokens: int,
                  turns: int, chat_tokens: int, gap_s: float, max_batch: int, chat_reserve: int,
                  repeats: int = 1, with_serial: bool = False, database: str = "sqlite", model: str = "demo") -> dict:
    """Measure on a private stack, alternating with in process (and on a MAX_BATCH=1 stack if asked)."""
    reqs = engine_bench.make_requests(jobs, tokens, "job")
    items = [item(r, tokens) for r in reqs]
    batched, engine_batched, alone = [], [], []
    with running(data_dir, database, max_batch, chat_reserve, model) as stack, requests.Session() as http:
        through_service(http, stack, items[:max_batch], tokens, "warmup")
        for _ in range(repeats):  # interleaved, so drift (other load on the host) hits every side alike
            batched.append(through_service(http, stack, items, tokens, f"service, MAX_BATCH={max_batch}"))
            engine_batched.append(in_process(engine, reqs, tokens, max_batch))
            alone.append(in_process(engine, reqs, tokens))
        rows = [median(batched), median(engine_batched), median(alone)]
        chats(stack, 2, chat_tokens, 0)  # warm the socket path
        idle = chats(stack, turns, chat_tokens, gap_s)
        busy, competition = under_batch(http, stack, batch_items, batch_tokens, turns, chat_tokens, gap_s, max_batch)
    if with_serial:
        with running(data_dir, database, 1, chat_reserve, model) as serial, requests.Session() as http:
            through_service(http, serial, items[:2], tokens, "warmup")
            rows.insert(2, median([through_service(http, serial, items, tokens, "service, MAX_BATCH=1")
                                   for _ in range(repeats)]))
    info, defaults = stack.worker_info, Settings.model_fields
    header = {
        "model": f"{info.get('model_label')} [in process: {engine.info.label}]",
        "device": f"{info.get('device')}; OMP_NUM_THREADS=1 in the worker, torch threads 1 in process; "
                  f"{os.cpu_count()} CPU cores shared by every process (worker, web, Redis, this bench); "
                  f"load average at the end {os.getloadavg()[0]:.1f}",
        "database": f"{database}, fresh, Alembic head: {stack.database_url.split('@')[-1]}",
        "scheduler": f"MAX_BATCH={max_batch}, CHAT_RESERVE={chat_reserve}, ADMIT_INTERVAL_S="
                     f"{defaults['admit_interval_s'].default}, TASK_BUDGET_S={defaults['task_budget_s'].default}; "
                     "1 Celery worker (solo pool, continuous batching), gunicorn gthread web, private redis-server"}
    return {"header": header, "repeats": repeats, "throughput": rows, "idle": idle, "busy": busy,
            "competition": competition}


def run_metrics_compare(data_dir: Path, rounds: int, jobs: int, tokens: int, max_batch: int, chat_reserve: int,
                        database: str = "sqlite") -> service.MetricsCost:
    """Measure batched throughput on a stack with worker metrics on and one with them off, alternating rounds."""
    items = [item(r, tokens) for r in engine_bench.make_requests(jobs, tokens, "job")]
    cost = service.MetricsCost(f"throughput of {jobs} jobs submitted at once as one POST /api/batches, {tokens} "
                               f"tokens each greedy, MAX_BATCH={max_batch}, one run per side per round",
                               "generated tokens/s", higher_is_better=True)

    def make(tmp: Path, metrics: bool) -> Stack:
        return Stack(data_dir, tmp, database, max_batch, chat_reserve, metrics)

    with service.two_stacks(make) as stacks, requests.Session() as http:
        def measure(stack: service.Stack) -> list[float]:
            return [through_service(http, stack, items, tokens, "").tokens_per_s]

        def warmup(stack: service.Stack) -> None:
            through_service(http, stack, items[:max_batch], tokens, "warmup")

        return service.compare_metrics(stacks, measure, warmup, rounds, cost)


def print_report(result: dict, tokens: int, batch_items: int, batch_tokens: int, chat_tokens: int,
                 gap_s: float) -> None:
    """Print the header and the two tables."""
    for key, value in result["header"].items():
        print(f"{key + ':':11}{value}")
    rows: list[Throughput] = result["throughput"]
    alone, own = rows[-1], next(r for r in rows if r.label.startswith("in process, engine.generate in batches"))
    print(f"\n1. Throughput: {rows[0].items} jobs submitted at once as one POST /api/batches (JSON items), "
          f"{tokens} tokens each greedy (min_tokens = max_tokens), one image each (bench.engine's 4 sizes); "
          "wall = POST -> GET /api/batches/<id> shows every item final (polled every 50 ms); "
          f"median of {result['repeats']} runs, service and in process alternating")
    names = ["wall s", "items/s", "generated tokens/s", "throughput vs one at a time in process",
             "throughput vs the engine's own batches of the same size (target >= 90 %)",
             "jobs generating at once, mean (workers' started_at/finished_at)"]
    cells = [[f"{r.wall_s:.2f}", f"{r.items_per_s:.2f}", f"{r.tokens_per_s:.1f}",
              f"{r.tokens_per_s / alone.tokens_per_s:.2f}x", f"{r.tokens_per_s / own.tokens_per_s:.0%}",
              f"{r.overlap:.2f}"] for r in rows]
    table(["", *(r.label for r in rows)], [[n, *v] for n, *v in zip(names, *cells, strict=True)])
    idle, busy, comp = result["idle"], result["busy"], result["competition"]
    print(f"\n2. Chat time to first token: {len(idle.client_ms)} turns over /ws/chat, one after another "
          f"{gap_s} s apart, {chat_tokens} tokens greedy, one 96x64 PNG each; idle, then while a {batch_items}-item "
          f"batch runs ({batch_tokens} tokens per item, same PNG); ms")

    def stats(v: list[float]) -> list[str]:
        return [f"{statistics.median(v):.1f}", f"{pct(v, 95):.1f}", f"{max(v):.1f}"]

    spans = [("client: chat frame sent -> first token frame", "client_ms"),
             ("worker queue_ms: job created -> row started", "queue_ms"),
             ("worker time_to_first_token_ms: row started -> first token", "worker_ms")]
    table(["span", "idle median", "idle p95", "idle max", "busy median", "busy p95", "busy max", "busy/idle median",
           "busy/idle p95"],
          [[name, *stats(getattr(idle, key)), *stats(getattr(busy, key)),
            f"{statistics.median(getattr(busy, key)) / statistics.median(getattr(idle, key)):.2f}x",
            f"{pct(getattr(busy, key), 95) / pct(getattr(idle, key), 95):.2f}x"] for name, key in spans])
    before, after = comp["before"], comp["after"]
    print(f"During the busy turns: {after['succeeded'] - before['succeeded']} batch items completed (succeeded "
          f"{before['succeeded']} -> {after['succeeded']}); at the end the batch was {comp['status']} with "
          f"{after['running']} running and {after['queued']} queued; then it was cancelled (DELETE).")


# Per shape: jobs, tokens, repeats, competing batch items, chat turns (the mid shape's step is ~20x the demo's).
DEFAULTS = {"demo": (64, 64, 3, 1000, 20), "mid": (16, 32, 2, 100, 6)}


@click.command()
@click.option("--shape", type=click.Choice([*SHAPES, "both"]), default="demo", show_default=True, help=SHAPE_HELP)
@click.option("--jobs", type=int, default=None, help="Concurrent jobs for the throughput [demo 64, mid 16].")
@click.option("--tokens", type=int, default=None, help="max_tokens = min_tokens per job [demo 64, mid 32].")
@click.option("--repeats", type=int, default=None, help="Throughput runs per column; median kept [demo 3, mid 2].")
@click.option("--max-batch", type=int, default=8, show_default=True, help="VLGATE_MAX_BATCH of the stack.")
@click.option("--chat-reserve", type=int, default=4, show_default=True, help="VLGATE_CHAT_RESERVE of the stack.")
@click.option("--serial/--no-serial", default=False, show_default=True,
              help="Also run the jobs through a second stack with MAX_BATCH=1.")
@click.option("--batch-items", type=int, default=None, help="Items of the competing batch [demo 1000, mid 100].")
@click.option("--batch-tokens", type=int, default=32, show_default=True, help="Tokens per competing batch item.")
@click.option("--turns", type=int, default=None, help="Chat turns idle and during the batch [demo 20, mid 6].")
@click.option("--chat-tokens", type=int, default=16, show_default=True, help="Tokens per chat turn.")
@click.option("--gap", "gap_s", type=float, default=0.3, show_default=True, help="Seconds between chat turns.")
@click.option("--database", type=click.Choice(["sqlite", "postgres"]), default="sqlite", show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Data dir with the demo checkpoint.")
@click.option("--metrics-compare", is_flag=True, help="Instead: batched throughput with worker metrics on vs off, "
              "as a ratio (two stacks, rounds alternating; --jobs x --tokens per side per round; demo shape).")
@click.option("--rounds", type=int, default=8, show_default=True, help="Rounds of --metrics-compare.")
def main(shape: str, jobs: int | None, tokens: int | None, repeats: int | None, max_batch: int, chat_reserve: int,
         serial: bool, batch_items: int | None, batch_tokens: int, turns: int | None, chat_tokens: int, gap_s: float,
         database: str, data_dir: Path | None, metrics_compare: bool, rounds: int) -> None:
    """Print service throughput with continuous batching versus in process, and chat TTFT under a batch."""
    from transformers.utils import logging as hf_logging

    from worker.loader import load_engine

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM tears the stack down like Ctrl-C
    hf_logging.disable_progress_bar()
    for name in SHAPES if shape == "both" and not metrics_compare else ("demo" if metrics_compare else shape,):
        given = [jobs, tokens, repeats, batch_items, turns]
        n_jobs, n_tokens, n_repeats, n_items, n_turns = (v or d for v, d in zip(given, DEFAULTS[name], strict=True))
        settings = shape_settings(name, data_dir)
        engine = load_engine(settings)  # builds the checkpoint first, so the worker finds it ready
        if metrics_compare:
            service.print_metrics_cost(run_metrics_compare(settings.data_dir, rounds, n_jobs, n_tokens, max_batch,
                                                           chat_reserve, database))
            return
        print(f"\n=== shape {name} ===")
        result = run_benchmark(engine, settings.data_dir, n_jobs, n_tokens, n_items, batch_tokens, n_turns,
                               chat_tokens, gap_s, max_batch, chat_reserve, n_repeats, serial, database, settings.model)
        print_report(result, n_tokens, n_items, batch_tokens, chat_tokens, gap_s)


if __name__ == "__main__":
    main()
