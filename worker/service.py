"""The worker process: load the model once, beat, reap orphaned jobs, and run jobs handed over by Celery."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis
from celery import Celery
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from common import jobs
from common.bus import TokenBus
from common.config import Settings
from common.db import make_engine, make_session_factory
from common.events import DoneEvent, ErrorEvent
from common.models import Job
from common.queue import EXIT_DEVICE_FAULT, enqueue, queue_depths
from common.schemas import WorkerStatus
from worker.capacity import running_rows
from worker.engine import Engine
from worker.faults import classify, device_fault, infrastructure_fault
from worker.metrics import make_metrics
from worker.runner import JobRunner

log = logging.getLogger(__name__)

MAX_LOAD_RETRY_S = 600.0


class WorkerService:
    """Everything one worker process holds: the engine, its heartbeat, and the job runner."""

    def __init__(self, settings: Settings, celery: Celery) -> None:
        self.settings = settings
        self.celery = celery
        self.worker_id = settings.worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.bus = TokenBus(redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5,
                                                 health_check_interval=30))
        self.db = make_session_factory(make_engine(settings.sqlalchemy_url))
        self.engine: Engine | None = None
        self.status = WorkerStatus(worker_id=self.worker_id, hostname=socket.gethostname(), pid=os.getpid(),
                                   state="loading", model=settings.model, started_at=time.time(),
                                   last_heartbeat=time.time())
        self.metrics = make_metrics(settings, self.worker_id)
        self.runner = JobRunner(settings, lambda: self.engine, self.db, self.bus, self.worker_id, self._set_busy,
                                enqueue=lambda job_id, queue: enqueue(celery, job_id, queue), metrics=self.metrics)
        self.exit: Callable[[int], None] = os._exit  # a test replaces it; a real worker must not linger
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._suspects: dict[str, float] = {}  # worker id -> when its liveness mark was first seen missing
        self._monitor = threading.Thread(target=self._monitor_loop, name="vlgate-monitor", daemon=True)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start beating, then load the model (blocking: no task is taken before the model is ready).

        A failed load is retried with backoff and reported in the heartbeat meanwhile; the worker never
        consumes a job without a model (it would only fail jobs that a healthy worker could run).
        """
        self.metrics.serve()  # before the load: a worker stuck loading shows vlgate_worker_model_loaded 0
        self._monitor.start()
        self.beat()
        from worker.loader import load_engine

        delay = self.settings.load_retry_s
        while not self._stop.is_set():
            try:
                engine = load_engine(self.settings)
                break
            except Exception as exc:  # noqa: BLE001 - reported through the heartbeat, then tried again
                log.exception("the model could not be loaded; trying again in %.0f s", delay)
                self._update(state="error", error=f"model load failed: {type(exc).__name__}: {exc}"[:1000])
                self._stop.wait(delay)
                delay = min(delay * 2, MAX_LOAD_RETRY_S)
        else:
            return
        self._reclaim_own_jobs()
        info = engine.info
        size = running_rows(self.settings, engine.model, info.device)
        log.info("running up to %d rows together (%s)", size.rows, size.reason)
        self.runner.max_batch = size.rows
        self.engine = engine
        self.metrics.model_loaded(info)
        self._update(state="idle", loaded=True, error=None, model_label=info.label, is_demo=info.is_demo,
                     device=info.device, fallback_reason=info.fallback_reason,
                     device_fallback_reason=info.device_fallback_reason, gpu_name=_gpu_name(info.device),
                     max_batch=size.rows, batch_sizing=size.reason)

    def _reclaim_own_jobs(self) -> None:
        """Hand back jobs an earlier process with this worker id held (a supervisor restarts a GPU's worker
        under the same id): they are orphans, and nobody should wait for their leases to run out."""
        try:
            with self.db() as db:
                held = list(db.scalars(select(Job.id).where(Job.worker_id == self.worker_id,
                                                            Job.status == "running")))
                released = jobs.release(db, held, self.worker_id, count_attempt=True)
            for job_id, queue in released:
                log.warning("re-queueing job %s, held by this worker's previous process", job_id)
                enqueue(self.celery, job_id, queue)
        except Exception:  # noqa: BLE001 - the reaper finds them when their leases run out
            log.warning("could not re-queue the previous process's jobs", exc_info=True)

    def stop(self) -> None:
        """Stop the background thread and /metrics, and remove this worker from the health report."""
        self._stop.set()
        self.metrics.close()
        self.runner.close()
        try:
            self.bus.forget_worker(self.worker_id)
        except redis.RedisError:
            pass

    def run_job(self, job_id: str) -> str | None:
        """Run one job; heal the worker after a device fault, wait out a Redis or database blip."""
        if self.status.state == "error" or self.engine is None:
            # Takes no work: the job stays queued in the database, where healthy workers admit it (and the
            # reaper re-enqueues it if the queue runs dry).
            log.error("not running job %s: worker is not ready (%s)", job_id, self.status.error)
            time.sleep(1.0)
            return None
        try:
            return self.runner.run(job_id)
        except Exception as exc:  # noqa: BLE001 - the runner handed the jobs in flight back to the queue
            if device_fault(exc):
                self._heal(exc)
            elif infrastructure_fault(exc):
                self._wait_for_services(exc)
            else:
                log.exception("job %s failed the worker", job_id)
            return None

    def _heal(self, exc: BaseException) -> None:
        """After a device fault: free memory and check the device; if it stays broken, exit for a restart."""
        log.error("device fault: %s: %s", type(exc).__name__, exc)
        self._free_gpu()
        problem = self._self_check()
        if problem is None:
            log.warning("the device recovered (a one-token generation works again); taking work")
            return
        self._update(state="error", error=f"GPU error: {type(exc).__name__}: {exc}; self-check: {problem}"[:1000])
        log.critical("the device is still broken (%s): exiting %d so the supervisor starts a fresh worker",
                     problem, EXIT_DEVICE_FAULT)
        self.exit(EXIT_DEVICE_FAULT)

    def _self_check(self) -> str | None:
        """Generate one token on a text prompt; return what went wrong, or None when the device works."""
        from worker.engine import GenerationRequest, Turn
        from worker.sampling import SamplingParams

        assert self.engine is not None
        try:
            probe = GenerationRequest("self-check", [Turn("user", "ping")], SamplingParams(temperature=0, max_tokens=1))
            result = self.engine.generate([probe])[0]
        except Exception as exc:  # noqa: BLE001 - any failure means the device is not usable
            return f"{type(exc).__name__}: {exc}"
        return None if result.finish_reason != "error" else (result.error_message or "the probe failed")

    def _wait_for_services(self, exc: BaseException) -> None:
        """After a Redis or database blip: wait, with backoff, until both answer again (bounded)."""
        log.warning("a backing service failed (%s: %s); waiting for it", type(exc).__name__, exc)
        deadline = time.monotonic() + self.settings.service_wait_s
        delay = 0.2
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                self.bus.redis.ping()
                with self.db() as db:
                    db.execute(text("SELECT 1"))
                log.warning("Redis and the database answer again; taking work")
                return
            except Exception as retry:  # noqa: BLE001 - still down: wait longer
                log.info("still waiting for the backing services: %s", retry)
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)

    # -- heartbeat and reaper ---------------------------------------------------------------------
    def beat(self) -> None:
        """Publish this worker's status now."""
        with self._lock:
            self.status.jobs_done = self.runner.jobs_done
            self.status.memory_used_mb, self.status.memory_total_mb = _gpu_memory(self.status.device)
            self.metrics.device_memory(self.status.device, self.status.memory_used_mb, self.status.memory_total_mb)
            try:
                self.bus.beat(self.status, self.settings.heartbeat_s * 3, alive_ttl_s=self.settings.liveness_ttl_s)
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def _update(self, **fields: object) -> None:
        """Change the reported status and publish it at once."""
        with self._lock:
            for key, value in fields.items():
                setattr(self.status, key, value)
        self.beat()

    def _set_busy(self, job_ids: list[str]) -> None:
        """Report busy while jobs run, idle after."""
        if self.status.state in ("idle", "busy"):
            self._update(state="busy" if job_ids else "idle", current_jobs=job_ids)

    def _monitor_loop(self) -> None:
        """Beat every heartbeat interval and reap every reaper interval until stopped."""
        next_reap = time.monotonic() + self.settings.reaper_interval_s
        tick = min(self.settings.heartbeat_s, self.settings.reaper_interval_s)
        next_beat = time.monotonic() + self.settings.heartbeat_s
        while not self._stop.wait(min(tick, 1.0)):
            now = time.monotonic()
            try:
                self.bus.touch_alive(self.worker_id, self.settings.liveness_ttl_s)
            except redis.RedisError:
                pass  # the heartbeat logs the outage
            if now >= next_beat:
                self.beat()
                next_beat = now + self.settings.heartbeat_s
            if now >= next_reap and self.engine is not None:
                try:
                    self.reap()
                except Exception as exc:  # noqa: BLE001 - the next pass tries again
                    self.metrics.fault(classify(exc))
                    log.warning("reaper pass failed", exc_info=True)
                next_reap = now + self.settings.reaper_interval_s

    def reap(self) -> jobs.Reaped:
        """Re-enqueue jobs whose worker died, and queued jobs lost with a restarted Redis (one reaper at a time)."""
        if not self.bus.lock("reaper", self.settings.reaper_interval_s * 0.9):
            return jobs.Reaped()
        with self.db() as db:
            found = jobs.reap(db, self.settings.max_attempts, self.settings.stale_queued_s, self._dead_workers(db))
            self.metrics.reaped(len(found.requeue), len(found.failed))
            depths = queue_depths(self.celery) if found.stale_queued else {}
            lost = [(j, q) for j, q in found.stale_queued if depths.get(q, 0) == 0]
            for job_id, queue in found.requeue + lost:
                log.warning("re-enqueueing orphaned job %s on %s", job_id, queue)
                enqueue(self.celery, job_id, queue)
            jobs.mark_enqueued(db, [j for j, _ in lost])
            for batch_id in jobs.reap_abandoned_batches(db, self.settings.upload_abandon_s):
                log.warning("deleted batch %s: its upload stopped before it was complete", batch_id)
        for job_id in found.failed:
            seq, text, _ = self.bus.snapshot(job_id)
            lost = ErrorEvent(seq=seq + 1, code="worker_lost", message="the job's worker was lost too many times")
            self.bus.publish(job_id, lost.wire(), len(text))
        for job_id in found.cancelled:
            seq, text, _ = self.bus.snapshot(job_id)
            done = DoneEvent(seq=seq + 1, response=text, status="cancelled", finish_reason="cancelled")
            self.bus.publish(job_id, done.wire(), len(text))
        return found

    def _dead_workers(self, db: Session) -> set[str]:
        """Return the workers holding jobs whose liveness mark has been missing for a whole liveness period.

        One missed look is not enough: after a Redis restart every mark is gone until the workers renew them
        a second later, and their jobs must not be taken from them for that.
        """
        holders = jobs.running_workers(db) - {self.worker_id}
        missing = holders - self.bus.alive_workers(holders)
        now = time.monotonic()
        self._suspects = {w: self._suspects.get(w, now) for w in missing}
        return {w for w, since in self._suspects.items() if now - since >= self.settings.liveness_ttl_s}

    def _free_gpu(self) -> None:
        """Release cached GPU memory after a failure (the caches' tensors may be what is broken)."""
        if self.engine is not None:
            self.engine.prefixes.clear()
            self.engine.vision.clear()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - best effort
            pass


def _gpu_name(device: str) -> str | None:
    """Return the GPU's name, or None on the CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(torch.device(device))


def _gpu_memory(device: str | None) -> tuple[float | None, float | None]:
    """Return (used, total) GPU memory in MiB, or (None, None) on the CPU."""
    if not device or not device.startswith("cuda"):
        return None, None
    try:
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        return round((total - free) / 2**20, 1), round(total / 2**20, 1)
    except Exception:  # noqa: BLE001 - a broken device reports no numbers
        return None, None
