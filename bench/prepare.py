"""Measure the decode-step time of running rows while new image requests arrive: preparation inline vs a pool.

A real JobRunner (SQLite, Redis, the demo model or the mid shape in process) decodes 4 long answers; meanwhile a
stream of new one-image jobs (distinct 1024x768 photo-like PNGs, stored beforehand as the web stores uploads)
is queued at a steady rate. Each new job's image is loaded and decoded, its chat template rendered and its pixels
processed either inside the decode loop (VLGATE_PREPARE_WORKERS=0, the old behaviour) or in a pool of threads or
processes. The running rows' step times (one decode step plus whatever the loop did between steps: admission,
preparation, the newcomers' prefill) are printed as p50/p95/max, side by side in one run, as ratios to inline.
"""

from __future__ import annotations

import hashlib
import io
import math
import statistics
import tempfile
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import redis
import torch
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from common.bus import TokenBus
from common.config import Settings
from common.db import make_engine, make_session_factory
from common.ids import new_id, utcnow
from common.jobspec import JobSpec, StopSpec, TurnSpec
from common.models import ChatSession, Job, Message, StoredImage
from devtools.databases import migrate
from worker.engine import Engine
from worker.metrics import DecodeSteps, WorkerMetrics
from worker.runner import JobRunner

# mode -> (pool workers, pool kind, torch threads of the decode loop: None keeps torch's default, every core)
MODES = {"inline": (0, "thread", None), "threads x1": (1, "thread", None), "threads x2": (2, "thread", None),
         "processes x1": (1, "process", None), "processes x2": (2, "process", None),
         "inline torch1": (0, "thread", 1), "threads x1 torch1": (1, "thread", 1),
         "processes x1 torch1": (1, "process", 1)}


@dataclass
class Run:
    """Step intervals of the running rows while the stream arrived, and how long the newcomers took."""

    mode: str
    steps_ms: list[float] = field(default_factory=list)
    newcomer_s: list[float] = field(default_factory=list)


class _Clock(DecodeSteps):
    """Record when each decode step's tokens went out, and which rows were running."""

    def __init__(self, ticks: list[tuple[float, int]], long_ids: set[str]) -> None:
        self.ticks, self.long_ids = ticks, long_ids

    def tick(self, row_ids: Collection[str], stopped: Collection[str]) -> None:
        running = sum(1 for r in row_ids if r.partition("#")[0] in self.long_ids)
        self.ticks.append((time.perf_counter(), running))


class _StepMetrics(WorkerMetrics):
    """Worker metrics that only keep the step clock."""

    def __init__(self, long_ids: set[str]) -> None:
        self.ticks: list[tuple[float, int]] = []
        self.long_ids = long_ids

    def decode_steps(self) -> DecodeSteps:
        return _Clock(self.ticks, self.long_ids)


def photo(seed: int, size: tuple[int, int] = (1024, 768)) -> bytes:
    """Encode a photo-like PNG: smooth colour gradients plus sensor-like noise (distinct per seed)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    channels = [np.sin(x / rng.uniform(40, 200) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(40, 200)) for _ in "rgb"]
    base = (np.stack(channels, axis=-1) * 90 + 128 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(base).save(buffer, format="PNG")
    return buffer.getvalue()


def store_image(db: Session, png: bytes) -> str:
    """Store a normalised PNG as the web does on upload; return its id."""
    image_id = new_id("img")
    with Image.open(io.BytesIO(png)) as image:
        width, height = image.size
    db.add(StoredImage(id=image_id, sha256=hashlib.sha256(png).hexdigest(), data=png, width=width, height=height,
                       size_bytes=len(png), source_format="png"))
    db.commit()
    return image_id


def store_job(db: Session, text: str, tokens: int, image_id: str | None = None) -> str:
    """Queue a greedy chat job that writes exactly ``tokens`` tokens; return its id."""
    session = ChatSession(id=new_id("sess"))
    db.add(session)
    db.flush()
    message = Message(session_id=session.id, role="user", text=text)
    db.add(message)
    db.flush()
    turn = TurnSpec(role="user", text=text, image_ids=[image_id] if image_id else [])
    spec = JobSpec(turns=[turn], sampling={"temperature": 0.0}, stop=StopSpec(max_tokens=tokens, min_tokens=tokens))
    job = Job(id=new_id("job"), session_id=session.id, user_message_id=message.id, enqueued_at=utcnow(),
              spec=spec.stored())
    db.add(job)
    db.commit()
    return job.id


def finished(db: sessionmaker[Session], job_ids: list[str]) -> dict[str, float]:
    """Return the jobs that are final, with their finish times (epoch seconds)."""
    with db() as session:
        rows = session.query(Job.id, Job.finished_at).filter(Job.id.in_(job_ids), Job.finished_at.isnot(None)).all()
    return {job_id: at.timestamp() for job_id, at in rows}


def measure(mode: str, engine: Engine, settings: Settings, db: sessionmaker[Session], bus: TokenBus,
            pngs: list[bytes], gap_s: float, rows: int) -> Run:
    """Decode ``rows`` long answers while one new image job arrives every ``gap_s``; return the step times."""
    workers, kind, threads = MODES[mode]
    mode_settings = settings.model_copy(update={"prepare_workers": workers, "prepare_kind": kind})
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)  # a core left to the pool, or not
    with db() as session:
        image_ids = [store_image(session, png) for png in pngs]
        long_ids = [store_job(session, "Tell me a long story.", settings.max_tokens_limit) for _ in range(rows)]
    metrics = _StepMetrics(set(long_ids))
    runner = JobRunner(mode_settings, lambda: engine, db, bus, f"bench-{mode}", metrics=metrics)
    while workers and runner.preparer(engine) is None:  # processes start (each imports torch) before the clock
        time.sleep(0.1)
    thread = threading.Thread(target=runner.run, args=(long_ids[0],), daemon=True)
    thread.start()
    while sum(1 for _, running in metrics.ticks[-3:] if running == rows) < 3:  # all long rows decoding
        time.sleep(0.01)
    start = time.perf_counter()
    queued: dict[str, float] = {}
    for image_id in image_ids:
        with db() as session:
            queued[store_job(session, "What is in this picture?", 4, image_id)] = time.time()
        time.sleep(gap_s)
    while len(done := finished(db, list(queued))) < len(queued):
        time.sleep(0.02)
    end = time.perf_counter()
    for job_id in long_ids:
        bus.request_cancel(job_id)
    thread.join(timeout=120)
    runner.close()
    torch.set_num_threads(default_threads)
    times = [t for t, running in metrics.ticks if running == rows and start <= t <= end]
    steps = [1e3 * (b - a) for a, b in zip(times, times[1:], strict=False)]
    return Run(mode, steps, [done[j] - queued[j] for j in queued])


def pct(values: list[float], q: float) -> float:
    """Return the nearest-rank percentile ``q`` (0-100) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def report(runs: dict[str, list[Run]]) -> None:
    """Print each mode's step-time percentiles pooled over rounds, and their ratios to inline preparation."""
    base = [s for r in runs["inline"] for s in r.steps_ms]
    print(f"{'mode':<20} {'steps':>6} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'mean ms':>8} "
          f"{'p50 x':>7} {'p95 x':>7} {'max x':>7} {'mean x':>7} {'newcomer p50 s':>15}")
    for mode, mode_runs in runs.items():
        steps = [s for r in mode_runs for s in r.steps_ms]
        newcomers = [s for r in mode_runs for s in r.newcomer_s]
        cells = [pct(steps, 50), pct(steps, 95), max(steps), statistics.fmean(steps)]
        bases = [pct(base, 50), pct(base, 95), max(base), statistics.fmean(base)]
        ratios = " ".join(f"{c / b:7.2f}" for c, b in zip(cells, bases, strict=True))
        print(f"{mode:<20} {len(steps):>6} " + " ".join(f"{c:8.1f}" for c in cells) +
              f" {ratios} {pct(newcomers, 50):15.2f}")
    print("x: the mode's figure over inline preparation's (below 1: the running rows stall less)")


@click.command()
@click.option("--shape", type=click.Choice(["demo", "mid"]), default="demo", show_default=True,
              help="demo: the tiny test model; mid: 36 layers, a CPU step like the 4B model's on a GPU.")
@click.option("--images", type=int, default=10, show_default=True, help="New image jobs per round and mode.")
@click.option("--gap", "gap_s", type=float, default=0.25, show_default=True, help="Seconds between new jobs.")
@click.option("--rows", type=int, default=4, show_default=True, help="Long answers decoding meanwhile.")
@click.option("--rounds", type=int, default=2, show_default=True, help="Rounds; the modes alternate within each.")
@click.option("--modes", default="inline,threads x1,processes x1,inline torch1,threads x1 torch1",
              show_default=True,
              help=f"Comma-separated, from: {', '.join(MODES)} (inline is always measured).")
@click.option("--device", default="cpu", show_default=True, help="'cpu' or 'cuda:N' (the decode loop's device).")
@click.option("--redis-url", default=None, help="Redis for the token stream; default VLGATE_REDIS_URL.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Data dir with the demo checkpoint.")
def main(shape: str, images: int, gap_s: float, rows: int, rounds: int, modes: str, device: str,
         redis_url: str | None, data_dir: Path | None) -> None:
    """Print the running rows' step times with preparation inline vs in a pool, as ratios."""
    from worker.loader import load_engine

    chosen = ["inline"] + [m.strip() for m in modes.split(",") if m.strip() and m.strip() != "inline"]
    unknown = set(chosen) - set(MODES)
    if unknown:
        raise click.BadParameter(f"unknown mode(s) {sorted(unknown)}", param_hint="--modes")
    base = Settings(device=device, hf_offline=True, **({"data_dir": data_dir} if data_dir else {}),
                    **({"redis_url": redis_url} if redis_url else {}))
    model = "demo"
    if shape != "demo":
        from worker.shapes import ensure_shaped_checkpoint

        model = str(ensure_shaped_checkpoint(base.demo_dir, shape))
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.sqlite'}"
        migrate(url)
        settings = base.model_copy(update={"model": model, "database_url": url, "max_batch": rows + images,
                                           "vision_cache_mb": 0, "prefix_cache_mb": 0})
        engine = load_engine(settings)
        db = make_session_factory(make_engine(url))
        bus = TokenBus(redis.Redis.from_url(settings.redis_url))
        print(f"prepare pool bench: {engine.info.label} on {engine.info.device}, torch threads "
              f"{torch.get_num_threads()}, {rows} long rows decoding, {images} new 1024x768 image jobs per "
              f"round one every {gap_s * 1e3:.0f} ms, {rounds} round(s), modes alternating")
        warm = [photo(10_000 + i) for i in range(2)]
        measure("inline", engine, settings, db, bus, warm, gap_s, rows)  # warm up the model and the processor
        runs: dict[str, list[Run]] = {mode: [] for mode in chosen}
        for round_no in range(rounds):
            for index, mode in enumerate(chosen):
                pngs = [photo(round_no * 1000 + index * 100 + i) for i in range(images)]
                runs[mode].append(measure(mode, engine, settings, db, bus, pngs, gap_s, rows))
        report(runs)


if __name__ == "__main__":
    main()
