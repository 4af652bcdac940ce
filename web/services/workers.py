"""The model gate: a request that needs the model waits briefly for a live worker that has it loaded."""

from __future__ import annotations

import time

from common.bus import TokenBus
from common.errors import ApiError
from common.schemas import WorkerStatus

POLL_S = 0.2


def ready_workers(workers: list[WorkerStatus]) -> list[WorkerStatus]:
    """Return the workers whose heartbeat says the model is loaded and usable."""
    return [w for w in workers if w.loaded and w.state != "error"]


def model_label(worker: WorkerStatus) -> str:
    """Return the name shown for a worker's model (the demo model says so)."""
    return worker.model_label or worker.model


def not_loaded_reason(workers: list[WorkerStatus]) -> str:
    """Explain from the heartbeats why no worker can serve the model."""
    if not workers:
        return "no worker is running"
    reasons = []
    for w in workers:
        if w.state == "error":
            reasons.append(f"worker {w.worker_id}: {w.error or 'unhealthy'}")
        else:
            reasons.append(f"worker {w.worker_id} is loading the model {model_label(w)}")
    return "; ".join(reasons)


def require_model(bus: TokenBus, wait_s: float) -> WorkerStatus:
    """Return a ready worker, waiting up to ``wait_s`` for one; else raise 503 ``model_not_loaded``."""
    deadline = time.monotonic() + wait_s
    while True:
        workers = bus.workers()
        ready = ready_workers(workers)
        if ready:
            return ready[0]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ApiError("model_not_loaded", f"The model is not loaded: {not_loaded_reason(workers)}.")
        time.sleep(min(POLL_S, remaining))
