"""Measure how many open streams one web process holds: 1,000 waiting clients (WebSocket followers of
/ws/jobs/<id>, /v1/chat/completions SSE streams, POST /api/chat waiters) against one gunicorn worker process
under each worker class, side by side in one run.

The worker side is faked in its own process, so only the web is measured: it claims jobs from the database as
a real worker does (common/jobs.py), publishes a token per job every ``--interval`` seconds through
common/bus.py (the text is the publish time, so relay latency is publish -> client), holds every job running
until all clients have been opened and held for ``--hold`` seconds, then finishes them (row first, then the
``done`` event, as a worker does). A job claimed after that gets one token and its done at once.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import math
import multiprocessing
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import redis
import requests
from sqlalchemy import String, cast, create_engine, func, select, text

from bench.stream_clients import Result, run_client, stamp
from common import jobs
from common.bus import TokenBus
from common.db import make_engine, make_session_factory
from common.events import DoneEvent, TokenEvent
from common.models import Job
from common.schemas import Usage, WorkerStatus
from devtools import live
from devtools.databases import POSTGRES_ADMIN_URL, fresh_database, make_image

WORKER_ID = "bench-fake"
LOGS = Path(tempfile.gettempdir()) / "vlgate-bench-streams"  # the last run's web log, kept for a look afterwards
BASE = ["-w", "1", "--timeout", "0", "--graceful-timeout", "5"]
# The worker classes compared; each runs one gunicorn worker process. The CLI flags override gunicorn.conf.py.
VARIANTS: dict[str, list[str]] = {
    "gthread-32": ["-k", "gthread", "--threads", "32"],
    "gthread-1100": ["-k", "gthread", "--threads", "1100", "--worker-connections", "2000"],  # the default
    "gevent": ["-k", "gevent", "--worker-connections", "2000"],
}


def fake_worker(db_url: str, redis_url: str, finish: Any, stop: Any, interval: float) -> None:
    """Hold claimed jobs running and stream a stamped token each per interval; after ``finish``, end them."""
    factory = make_session_factory(make_engine(db_url))
    bus = TokenBus(redis.Redis.from_url(redis_url))
    status = WorkerStatus(worker_id=WORKER_ID, hostname=socket.gethostname(), pid=os.getpid(), state="busy",
                          model="demo", model_label="demo (bench)", is_demo=True, loaded=True,
                          started_at=time.time(), last_heartbeat=0)
    held: dict[str, tuple[int, str]] = {}  # job id -> (last seq, text so far)
    next_beat = 0.0
    while not stop.is_set():
        if time.monotonic() >= next_beat:
            bus.beat(status, ttl_s=10)
            next_beat = time.monotonic() + 1
        with factory() as db:
            for job in jobs.claim_next(db, WORKER_ID, 3600, 3, 100_000, ("chat",)):
                held[job.id] = (0, "")
        ending = finish.is_set()
        events: list[tuple[str, dict[str, Any], int | None]] = []
        for job_id, (seq, sofar) in held.items():
            if not ending or seq == 0:
                piece = stamp()
                held[job_id] = (seq + 1, sofar + piece)
                events.append((job_id, TokenEvent(seq=seq + 1, text=piece).wire(), len(sofar + piece)))
        bus.publish_many(events)
        if ending:
            _finish_all(factory, bus, held)
        stop.wait(interval if not ending else 0.05)


def _finish_all(factory: Any, bus: TokenBus, held: dict[str, tuple[int, str]]) -> None:
    """Store each held job's answer, then publish its done (a worker commits the row first)."""
    with factory() as db:
        for job_id, (seq, sofar) in held.items():
            jobs.finish(db, job_id, WORKER_ID, jobs.Outcome(status="succeeded", response=sofar, finish_reason="stop",
                                                            prompt_tokens=1, completion_tokens=seq))
    usage = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
    bus.publish_many([(j, DoneEvent(seq=s + 1, response=t, finish_reason="stop", usage=usage, timings={}).wire(), None)
                      for j, (s, t) in held.items()])
    held.clear()


class Sampler(threading.Thread):
    """Sample the gunicorn worker's RSS, open files and threads, and the database's connections."""

    def __init__(self, pid: int, database: str) -> None:
        super().__init__(daemon=True)
        self.pid, self.database = pid, database
        self.peak = {"rss_mb": 0.0, "fds": 0, "threads": 0, "db_conns": 0, "db_idle_in_tx": 0, "cpu_s": 0.0}
        self.stopped = threading.Event()

    def run(self) -> None:
        admin = create_engine(POSTGRES_ADMIN_URL)
        query = text("SELECT count(*), count(*) FILTER (WHERE state = 'idle in transaction') FROM pg_stat_activity "
                     "WHERE datname = :db AND application_name NOT LIKE 'bench%'")
        while not self.stopped.wait(0.25):
            now = proc_stats(self.pid)
            with admin.connect() as conn:
                now["db_conns"], now["db_idle_in_tx"] = conn.execute(query, {"db": self.database}).one()
            for key, value in now.items():
                self.peak[key] = max(self.peak[key], value)
        admin.dispose()


def proc_stats(pid: int) -> dict[str, Any]:
    """Return a process's resident MiB, open file descriptors and threads."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    utime, stime = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(fields["Threads"]), "cpu_s": (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")}


def worker_pid(master: int) -> int:
    """Return the pid of the gunicorn master's one worker process."""
    def child() -> int | None:
        kids = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        return int(kids[0]) if kids else None

    return live.wait_until(child, 30, 0.1, "the gunicorn worker")


def pct(values: list[float], q: float) -> float:
    """Return the nearest-rank percentile ``q`` (0-100), NaN for no values."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else math.nan


def heavy_submissions(base: str, images: int, timeout_s: float) -> tuple[float, float, float]:
    """Submit ``images`` chat jobs one after another, each with a 4000x3000 PNG to decode and downscale (CPU
    work in the web); return the window's start, its end and the median submission time in ms."""
    image = base64.b64encode(make_image((4000, 3000))).decode()
    start, times = time.time(), []
    for i in range(images):
        began = time.perf_counter()
        try:  # with every thread held by a waiting client, it is never served: that is a result too
            requests.post(f"{base}/api/jobs", json={"prompt": f"bench:image {i}", "image": image, "max_tokens": 8},
                          timeout=timeout_s).raise_for_status()
        except requests.RequestException:
            return start, time.time(), math.nan
        times.append((time.perf_counter() - began) * 1000)
    return start, time.time(), statistics.median(times) if times else math.nan


def submit(base: str, prompt: str) -> str:
    """POST /api/jobs and return the job id."""
    reply = requests.post(f"{base}/api/jobs", json={"prompt": prompt, "max_tokens": 64}, timeout=60)
    if reply.status_code != 202:
        raise RuntimeError(f"POST /api/jobs: {reply.status_code} {reply.text[:300]}")
    return reply.json()["job_id"]


@contextmanager
def deployment(tmp: Path, args: list[str], interval: float) -> Iterator[dict[str, Any]]:
    """Run a private Redis, a fresh Postgres database, the fake worker and one gunicorn web process."""
    LOGS.mkdir(exist_ok=True)
    (LOGS / "web.log").unlink(missing_ok=True)
    databases = fresh_database("postgres", tmp)
    db_url = next(databases)
    redis_port, web_port = live.free_port(), live.free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = live.stack_env(db_url, redis_url, tmp / "data", VLGATE_MAX_QUEUED_CHAT="100000", VLGATE_CHAT_WAIT_S="900",
                         VLGATE_MODEL_WAIT_S="30")
    redis_server = live.redis_server(redis_port, tmp).start()
    mp = multiprocessing.get_context("spawn")
    finish, stop = mp.Event(), mp.Event()
    fake = mp.Process(target=fake_worker, daemon=True,
                      args=(f"{db_url}?application_name=bench-fake", redis_url, finish, stop, interval))
    argv = [str(live.BIN / "gunicorn"), *args, *BASE, "-b", f"127.0.0.1:{web_port}", "web:create_app()"]
    web = live.Service("web", argv, env, LOGS)
    try:
        live.wait_until(lambda: redis.Redis.from_url(redis_url).ping(), 10, 0.05, "redis")
        fake.start()
        web.start()
        base = f"http://127.0.0.1:{web_port}"
        live.wait_for_web(base)
        assert web.proc is not None
        yield {"base": base, "port": web_port, "finish": finish, "pid": worker_pid(web.proc.pid), "fake": fake.pid,
               "database": db_url.rsplit("/", 1)[1], "db_url": db_url}
    except BaseException:
        print(web.log())
        raise
    finally:
        stop.set()
        web.stop()
        fake.join(10)
        redis_server.stop()
        next(databases, None)


async def open_clients(port: int, plan: list[tuple[str, str]], ramp_s: float, results: list[Result]
                       ) -> list[asyncio.Task[None]]:
    """Start one client per plan entry, spread evenly over ``ramp_s`` seconds."""
    tasks = []
    for kind, target in plan:
        result = Result(kind)
        results.append(result)
        tasks.append(asyncio.create_task(run_client(kind, "127.0.0.1", port, result, target)))
        await asyncio.sleep(ramp_s / len(plan))
    return tasks


def measure(name: str, args: list[str], clients: int, hold_s: float, ramp_s: float, drain_s: float,
            interval: float, images: int) -> dict[str, Any]:
    """Run one variant and return its figures."""
    n_ws = n_sse = clients * 2 // 5
    n_chat = clients - n_ws - n_sse
    with tempfile.TemporaryDirectory(prefix="vlgate-streams-") as tmp, \
            deployment(Path(tmp), args, interval) as dep:
        base, pid = dep["base"], dep["pid"]
        for _ in range(3):
            requests.get(f"{base}/api/health", timeout=10)
        with ThreadPoolExecutor(8) as pool:  # the followed jobs exist before the clients come
            ws_jobs = list(pool.map(lambda i: submit(base, f"bench:ws {i}"), range(n_ws)))
        before = proc_stats(pid)
        plan = [("ws", j) for j in ws_jobs] + [("sse", f"bench:sse {i}") for i in range(n_sse)] + \
            [("chat", f"bench:chat {i}") for i in range(n_chat)]
        plan = [plan[i] for i in sorted(range(len(plan)), key=lambda i: (i * 7919) % len(plan))]  # interleave kinds
        sampler = Sampler(pid, dep["database"])
        sampler.start()
        results: list[Result] = []
        engine = create_engine(f"{dep['db_url']}?application_name=bench")

        async def run() -> dict[str, Any]:
            tasks = await open_clients(dep["port"], plan, ramp_s, results)
            pids = {"web": pid, "fake worker": dep["fake"], "clients": os.getpid()}
            held_from = {k: proc_stats(p)["cpu_s"] for k, p in pids.items()}
            print(f"    holding {clients} clients for {hold_s} s (web worker pid {pid})", flush=True)
            await asyncio.sleep(hold_s / 2)
            heavy = await asyncio.to_thread(heavy_submissions, base, images, hold_s / 2)
            await asyncio.sleep(max(0.0, hold_s / 2 - (heavy[1] - heavy[0])))
            hold_cpu = {k: (proc_stats(p)["cpu_s"] - held_from[k]) / hold_s for k, p in pids.items()}
            with engine.connect() as conn:  # a chat waiter is being served once its job exists
                chat_served = conn.execute(select(func.count()).select_from(Job).where(
                    cast(Job.spec, String).like("%bench:chat%"))).scalar_one()
            served = sum(1 for r in results if r.kind != "chat" and r.served_at) + chat_served
            start = time.time()
            dep["finish"].set()
            await asyncio.wait(tasks, timeout=drain_s)
            done = [r for r in results if r.done_at and not r.error]
            last = max((r.done_at for r in done), default=math.nan)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return {"heavy": heavy, "hold_cpu": hold_cpu, "served": served, "done": len(done),
                    "all_done_s": last - start if len(done) == clients else math.nan}

        figures = asyncio.run(run())
        engine.dispose()
        time.sleep(3)  # closed clients: let the web drop their subscriptions
        sampler.stopped.set()
        sampler.join()
        after = proc_stats(pid)
    latencies = [lat * 1000 for r in results for _, lat in r.latencies]
    start, end, heavy_ms = figures["heavy"]
    during = [lat * 1000 for r in results for at, lat in r.latencies if start <= at <= end + 0.5]
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {**figures, "name": name, "before": before, "peak": sampler.peak, "after": after,
            "p50": pct(latencies, 50), "p99": pct(latencies, 99), "heavy_ms": heavy_ms,
            "heavy_p99": pct(during, 99), "heavy_max": max(during, default=math.nan), "tokens": len(latencies),
            "errors": errors, "retries": sum(r.retries for r in results)}


def report(rows: list[dict[str, Any]], clients: int) -> None:
    """Print the variants side by side."""
    lines = [
        (f"served concurrently (of {clients})", lambda r: f"{r['served']}"),
        ("got done without error", lambda r: f"{r['done']}"),
        ("429/503 answers retried (Retry-After)", lambda r: f"{r['retries']}"),
        ("finish -> all done (s)", lambda r: f"{r['all_done_s']:.1f}"),
        ("web CPU while holding (cores)", lambda r: f"{r['hold_cpu']['web']:.2f}"),
        ("bench clients / fake worker CPU", lambda r: f"{r['hold_cpu']['clients']:.2f}/"
                                                    f"{r['hold_cpu']['fake worker']:.2f}"),
        ("token relay p50 (ms)", lambda r: f"{r['p50']:.1f}"),
        ("token relay p99 (ms)", lambda r: f"{r['p99']:.1f}"),
        ("image submissions mid-hold: median (ms)", lambda r: f"{r['heavy_ms']:.0f}"),
        ("token relay p99 / max meanwhile (ms)", lambda r: f"{r['heavy_p99']:.0f}/{r['heavy_max']:.0f}"),
        ("tokens relayed live", lambda r: f"{r['tokens']}"),
        ("web RSS before (MiB)", lambda r: f"{r['before']['rss_mb']:.0f}"),
        ("web RSS peak (MiB)", lambda r: f"{r['peak']['rss_mb']:.0f}"),
        ("web RSS after (MiB)", lambda r: f"{r['after']['rss_mb']:.0f}"),
        ("fds before / peak / after", lambda r: f"{r['before']['fds']}/{r['peak']['fds']}/{r['after']['fds']}"),
        ("threads peak", lambda r: f"{r['peak']['threads']}"),
        ("DB connections peak", lambda r: f"{r['peak']['db_conns']}"),
        ("DB idle in transaction peak", lambda r: f"{r['peak']['db_idle_in_tx']}"),
    ]
    table = [[label, *(show(r) for r in rows)] for label, show in lines]
    headers = ["", *(r["name"] for r in rows)]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    for line in [headers, ["-" * w for w in widths], *table]:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))))
    for r in rows:
        if r["errors"]:
            print(f"{r['name']} errors: {r['errors']}")


@click.command()
@click.option("--clients", default=1000, show_default=True, help="Waiting clients: 2/5 WS, 2/5 SSE, 1/5 /api/chat.")
@click.option("--hold", "hold_s", default=15.0, show_default=True, help="Seconds the jobs stay running after the ramp.")
@click.option("--ramp", "ramp_s", default=5.0, show_default=True, help="Seconds over which the clients connect.")
@click.option("--drain", "drain_s", default=120.0, show_default=True, help="Most seconds to wait for every done.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between a job's tokens.")
@click.option("--images", default=5, show_default=True, help="Image submissions (CPU work in the web) mid-hold.")
@click.option("--variants", default=",".join(VARIANTS), show_default=True, help="Worker classes to compare.")
def main(clients: int, hold_s: float, ramp_s: float, drain_s: float, interval: float, images: int,
         variants: str) -> None:
    """Compare worker classes holding many open streams in one web process."""
    print(f"bench.streams: {clients} waiting clients on one gunicorn worker process (Postgres, private Redis, a "
          f"fake worker streaming one token per job every {interval} s), {os.cpu_count()} CPUs")
    rows = []
    for name in variants.split(","):
        if "gevent" in VARIANTS[name] and importlib.util.find_spec("gevent") is None:
            print(f"... {name}: skipped, gevent is not installed (requirements-dev.txt has it)")
            continue
        print(f"... {name}", flush=True)
        rows.append(measure(name, VARIANTS[name], clients, hold_s, ramp_s, drain_s, interval, images))
    report(rows, clients)


if __name__ == "__main__":
    main()
