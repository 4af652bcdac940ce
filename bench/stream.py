"""Measure the token stream on the demo model: first-token time over /ws/chat and over /v1 SSE versus the worker's
own, and the per-token relay latency Redis -> web -> WebSocket at 1 and at N concurrent streams."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click
import redis
import requests
from simple_websocket import Client, ConnectionClosed

from bench import service
from bench.service import IMAGE_B64, PROMPT, pct, table
from common.bus import job_channel
from common.config import Settings
from devtools import live
from worker.demo import ensure_demo_checkpoint

# One chat turn, cut by the client's clock, the reference listener's and the job's timings (epoch, same host).
WS_FIRST = ["client TTFT: chat frame sent -> first token frame received",
            "worker TTFT: job created (queued_at) -> first token sampled (first_token_at)",
            "first-token relay: first_token_at -> client has the frame",
            "  of which worker: first_token_at -> Redis reference listener",
            "  of which web: Redis reference listener -> client",
            "for reference, submit: chat frame sent -> job created (queued_at)"]
# The same turn as a streamed /v1/chat/completions, cut the same way (labels differ: they are the table's keys).
SSE_FIRST = ["SSE client TTFT: POST /v1/chat/completions sent -> first content chunk received",
             "SSE worker TTFT: job created (queued_at) -> first token sampled (first_token_at)",
             "SSE first-token relay: first_token_at -> client has the chunk",
             "  of which worker, SSE turn: first_token_at -> Redis reference listener",
             "  of which web, SSE turn: Redis reference listener -> client",
             "for reference, SSE submit: POST sent -> job created (queued_at)"]
FIRST = WS_FIRST + SSE_FIRST
RELAY_ROWS = (WS_FIRST[2], SSE_FIRST[2])
MODEL = "demo"  # the id /v1 serves for the demo checkpoint


class Stack(service.Stack):
    """bench.service's private stack (production lease/reaper timings) with ``workers`` Celery workers."""

    def __init__(self, data_dir: Path, tmp: Path, database: str, workers: int) -> None:
        super().__init__(data_dir, tmp, database)
        env = self.services[-1].env  # live.worker sets VLGATE_WORKER_ID itself
        self.services += [live.worker(f"bench-w{i}", env, tmp) for i in range(2, workers + 1)]
        self.redis_url, self.workers = env["VLGATE_REDIS_URL"], workers

    def start(self) -> None:
        super().start()  # waits for bench-w1
        for i in range(2, self.workers + 1):
            live.wait_for_worker(self.base, f"bench-w{i}", timeout=120)


class RedisTap:
    """Reference listener: every token event on ``vlgate:job:*`` with the epoch time it arrived from Redis."""

    def __init__(self, url: str) -> None:
        self.seen: dict[tuple[str, int], tuple[float, str]] = {}
        self.first: dict[str, float] = {}  # job -> when its first token event arrived (events come in seq order)
        self.pubsub = redis.Redis.from_url(url).pubsub()
        self.pubsub.psubscribe(**{job_channel("*"): self.on_message})
        if (self.pubsub.get_message(timeout=5) or {}).get("type") != "psubscribe":  # in force before any job
            raise RuntimeError("PSUBSCRIBE was not confirmed")
        self.thread = self.pubsub.run_in_thread(sleep_time=0.1, daemon=True)

    def on_message(self, message: dict) -> None:
        now, event = time.time(), json.loads(message["data"])
        if event["type"] == "token":
            job = message["channel"].decode().rsplit(":", 1)[-1]
            self.seen[(job, event["seq"])] = (now, event["text"])
            self.first.setdefault(job, now)

    def wait_for(self, keys: list[tuple[str, int]], timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while any(k not in self.seen for k in keys) and time.monotonic() < deadline:
            time.sleep(0.01)

    def first_token(self, job_id: str, timeout: float = 2.0) -> float:
        """Return when the job's first token event arrived, waiting up to ``timeout`` for it."""
        deadline = time.monotonic() + timeout
        while job_id not in self.first and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.first[job_id]

    def stop(self) -> None:
        self.thread.stop()  # its loop closes the pubsub
        self.thread.join(5)


@dataclass
class Stream:
    """What one WebSocket client saw of one chat turn: when it sent it and when each token frame came."""

    sent: float
    job_id: str = ""
    tokens: list[tuple[int, str, float]] = field(default_factory=list)  # (seq, text, received at)
    done: dict = field(default_factory=dict)


@dataclass
class SseTurn:
    """What one /v1 streaming client saw of one completion: when it sent it, got its first content chunk, and usage."""

    sent: float
    job_id: str
    first_at: float
    usage: dict


@dataclass
class Relay:
    """Per-token lag ws - Redis listener of one run of ``streams`` concurrent turns, and its event rate."""

    streams: int
    lags_ms: list[float]
    missing: int  # token frames whose (job, seq) the reference listener never saw
    frames_per_s: float  # token frames over all streams / wall time of the run
    gaps_ms: list[float]  # per stream, between consecutive token events at the listener
    overlap: float  # mean jobs generating at once, from the workers' timings


def chat(ws: Client, tokens: int) -> Stream:
    """Run one chat turn on an open /ws/chat socket, stamping every frame with time.time() on arrival."""
    body = json.dumps({"type": "chat", "prompt": PROMPT, "image": IMAGE_B64, "max_tokens": tokens,
                       "min_tokens": tokens, "temperature": 0})
    out = Stream(time.time())
    ws.send(body)
    while True:
        raw, now = ws.receive(timeout=120), time.time()
        event = json.loads(raw) if raw is not None else {"type": "timeout"}
        if event["type"] == "accepted":
            out.job_id = event["job_id"]
        elif event["type"] == "token":
            out.tokens.append((event["seq"], event["text"], now))
        elif event["type"] == "done" and event["status"] == "succeeded" and out.tokens:
            out.done = event
            return out
        else:
            raise RuntimeError(f"job {out.job_id}: unexpected {str(raw)[:300]}")


def sse_chat(http: requests.Session, base: str, tokens: int) -> SseTurn:
    """Stream the chat turn's twin from /v1/chat/completions, stamping every SSE line with time.time() on arrival."""
    content = [{"type": "text", "text": PROMPT},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMAGE_B64}"}}]
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
            "min_tokens": tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    first_at, usage = None, {}
    sent = time.time()
    with http.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=120) as answer:
        job_id = answer.headers.get("x-request-id", "")
        # Unchunked, urllib3 would read to the end before yielding anything: the stamps would mean nothing.
        if answer.status_code != 200 or answer.headers.get("Transfer-Encoding") != "chunked":
            raise RuntimeError(f"job {job_id}: HTTP {answer.status_code} {dict(answer.headers)}: {answer.text[:300]}")
        for line in answer.iter_lines(chunk_size=None):  # each HTTP chunk as it comes, not 512-byte reads
            now = time.time()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"job {job_id}: {chunk['error']}")
            usage = chunk.get("usage") or usage
            # The role chunk comes before any token; the first chunk with content alone carries the first token.
            if first_at is None and any("content" in c["delta"] and "role" not in c["delta"] for c in chunk["choices"]):
                first_at = now
    if first_at is None or usage.get("completion_tokens") != tokens:
        raise RuntimeError(f"job {job_id}: no content chunk, or usage {usage} is not {tokens} tokens")
    return SseTurn(sent, job_id, first_at, usage)


@contextlib.contextmanager
def chat_socket(stack: Stack) -> Iterator[Client]:
    ws = Client.connect(stack.base.replace("http://", "ws://") + "/ws/chat")
    try:
        yield ws
    finally:
        with contextlib.suppress(ConnectionClosed):
            ws.close()


def cut(sent: float, got: float, tapped: float, t: dict) -> list[float]:
    """Split one turn's first token by the three clocks, in the order of WS_FIRST and SSE_FIRST; ms."""
    spans = [got - sent, t["first_token_at"] - t["queued_at"], got - t["first_token_at"], tapped - t["first_token_at"],
             got - tapped, t["queued_at"] - sent]
    return [span * 1e3 for span in spans]


def measure_first_token(stack: Stack, tap: RedisTap, turns: int, warmup: int, tokens: int) -> dict[str, list]:
    """Alternate the same turn on one socket and as /v1 SSE on one keep-alive connection; cut each first token."""
    out: dict[str, list[float]] = {row: [] for row in FIRST}

    def ws_turn(ws: Client) -> list[float]:
        s = chat(ws, tokens)
        seq, _, got = s.tokens[0]
        tap.wait_for([(s.job_id, seq)])
        return cut(s.sent, got, tap.seen[(s.job_id, seq)][0], s.done["timings"])

    def sse_turn(http: requests.Session) -> list[float]:
        s = sse_chat(http, stack.base, tokens)
        tapped = tap.first_token(s.job_id)
        job = http.get(f"{stack.base}/api/jobs/{s.job_id}", timeout=30).json()  # final: [DONE] came after the row
        return cut(s.sent, s.first_at, tapped, job["timings"])

    with chat_socket(stack) as ws, requests.Session() as http:
        for i in range(warmup + turns):
            if i % 2:  # swap the order every turn, so neither transport always runs right after the other
                ws_spans, sse_spans = ws_turn(ws), sse_turn(http)
            else:
                sse_spans = sse_turn(http)
                ws_spans = ws_turn(ws)
            if i < warmup:
                continue
            for row, span in zip(FIRST, [*ws_spans, *sse_spans], strict=True):
                out[row].append(span)
    return out


def measure_relay(stack: Stack, tap: RedisTap, streams: int, tokens: int) -> Relay:
    """Start ``streams`` turns at once, one socket per client thread; match each token frame to Redis's event."""
    barrier = threading.Barrier(streams)

    def client(_: int) -> Stream:
        with chat_socket(stack) as ws:
            barrier.wait(30)
            return chat(ws, tokens)

    start = time.time()
    with ThreadPoolExecutor(streams) as pool:
        runs = list(pool.map(client, range(streams)))
    wall = time.time() - start  # from the clients' connecting to the last done: includes the first-token time
    keys = [(s.job_id, seq) for s in runs for seq, _, _ in s.tokens]
    tap.wait_for(keys)
    seen = tap.seen.copy()
    lags = [(got - seen[(s.job_id, seq)][0]) * 1e3 for s in runs for seq, _, got in s.tokens if (s.job_id, seq) in seen]
    gaps = []
    for s in runs:
        at = sorted(t for (job, _), (t, _) in seen.items() if job == s.job_id)
        gaps += [(b - a) * 1e3 for a, b in zip(at, at[1:], strict=False)]
    spans = [(s.done["timings"]["started_at"], s.done["timings"]["finished_at"]) for s in runs]
    overlap = sum(b - a for a, b in spans) / (max(b for _, b in spans) - min(a for a, _ in spans))
    return Relay(streams, lags, len(keys) - len(lags), len(keys) / wall, gaps, overlap)


def run_benchmark(data_dir: Path, turns: int, warmup: int, turn_tokens: int, streams: int, stream_tokens: int,
                  workers: int, database: str = "sqlite") -> tuple[dict[str, str], dict[str, list], list[Relay]]:
    """Start a private stack and a Redis reference listener, measure, and always tear both down."""
    ensure_demo_checkpoint(Settings(data_dir=data_dir).demo_dir)  # built once here, not raced by the workers
    with tempfile.TemporaryDirectory(prefix="vlgate-bench-") as tmp:
        stack, tap = Stack(data_dir, Path(tmp), database, workers), None
        try:
            stack.start()
            tap = RedisTap(stack.redis_url)
            first = measure_first_token(stack, tap, turns, warmup, turn_tokens)
            measure_relay(stack, tap, streams, min(stream_tokens, 16))  # warm every socket path and worker
            relays = [measure_relay(stack, tap, n, stream_tokens) for n in (1, streams)]
        finally:
            if tap is not None:
                tap.stop()
            stack.stop()
    argv, info = stack.services[1].argv, stack.worker_info
    header = {
        "model": str(info.get("model_label")),
        "device": f"{info.get('device')}, OMP_NUM_THREADS=1 per worker; {os.cpu_count()} CPU cores shared by "
                  "every process (workers, web, Redis, this bench)",
        "database": f"{database}, fresh, Alembic head: {stack.database_url.split('@')[-1]}",
        "web": f"gunicorn -k gthread, {argv[argv.index('-w') + 1]} worker x {argv[argv.index('--threads') + 1]} "
               f"threads (a thread per open socket); private redis-server; {workers} Celery worker(s), solo pool, "
               "continuous batching (one per GPU in production)",
        "listener": "reference: Redis PSUBSCRIBE vlgate:job:* in a thread of this process; every time is "
                    "time.time() on one host"}
    return header, first, relays


def print_report(header: dict[str, str], first: dict[str, list], relays: list[Relay], turn_tokens: int,
                 stream_tokens: int) -> None:
    """Print the header and the two tables."""
    for key, value in header.items():
        print(f"{key + ':':10}{value}")
    print(f"\n1. First token, {len(first[FIRST[0]])} chat turns after warmup, one after another on one /ws/chat "
          f"socket: {turn_tokens} tokens greedy, one 96x64 PNG each; ms")
    print("   Each alternates with the same turn streamed from POST /v1/chat/completions (SSE rows; one keep-alive "
          "connection), order swapped every turn.")
    table(["span", "median", "p95", "mean"], [[row, f"{statistics.median(v):.2f}", f"{pct(v, 95):.2f}",
                                              f"{statistics.mean(v):.2f}"] for row, v in first.items()])
    ws, sse = (first[row] for row in RELAY_ROWS)
    paired = statistics.median([s / w for s, w in zip(sse, ws, strict=True)])  # turns ran side by side
    print(f"first-token relay, SSE / WS: {statistics.median(sse) / statistics.median(ws):.2f}x of medians "
          f"({statistics.median(sse):.2f} / {statistics.median(ws):.2f} ms); median of per-turn ratios {paired:.2f}x")
    print(f"\n2. Per-token relay: ws frame received - same (job, seq) received by the Redis reference listener; "
          f"{stream_tokens} tokens per stream, all streams sent at once, one socket and thread per client")
    print("   Demo CPU model: tokens come every few ms per stream, so the relay runs under a high event rate.\n"
          "   Both stamps are taken in this process (one GIL for the listener and the client threads); the lag is "
          "web relay + WebSocket + waking the client thread.")

    def col(r: Relay) -> list[str]:
        return [str(len(r.lags_ms)), f"{statistics.median(r.lags_ms):.2f}", f"{pct(r.lags_ms, 95):.2f}",
                f"{max(r.lags_ms):.2f}", f"{r.frames_per_s:.0f}", f"{statistics.median(r.gaps_ms):.2f}",
                f"{r.overlap:.2f}", str(r.missing)]

    names = ["token frames measured", "lag median ms", "lag p95 ms", "lag max ms",
             "token frames/s, all streams, over the run's wall time",
             "gap between a stream's tokens at Redis, median ms", "jobs generating at once, mean",
             "frames never seen on Redis"]
    table(["", *(f"{r.streams} stream{'s' * (r.streams > 1)}" for r in relays)],
          [[name, *values] for name, *values in zip(names, *(col(r) for r in relays), strict=True)])


@click.command()
@click.option("--turns", type=int, default=30, show_default=True, help="Measured chat turns for the first token.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Unmeasured turns first.")
@click.option("--turn-tokens", type=int, default=16, show_default=True, help="max_tokens = min_tokens per turn.")
@click.option("--streams", type=int, default=8, show_default=True, help="Concurrent streams for the relay.")
@click.option("--stream-tokens", type=int, default=256, show_default=True, help="Tokens per relay stream.")
@click.option("--workers", type=int, default=1,
              help="Celery workers (one continuously batches all streams; more = one per GPU).")
@click.option("--database", type=click.Choice(["sqlite", "postgres"]), default="sqlite", show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Data dir with the demo checkpoint.")
def main(turns: int, warmup: int, turn_tokens: int, streams: int, stream_tokens: int, workers: int | None,
         database: str, data_dir: Path | None) -> None:
    """Print first-token times over /ws/chat and /v1 SSE and the per-token relay latency of one private stack."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM tears the stack down like Ctrl-C
    settings = Settings(model="demo", device="cpu", hf_offline=True, **({"data_dir": data_dir} if data_dir else {}))
    result = run_benchmark(settings.data_dir, turns, warmup, turn_tokens, streams, stream_tokens,
                           workers, database)
    print_report(*result, turn_tokens, stream_tokens)


if __name__ == "__main__":
    main()
