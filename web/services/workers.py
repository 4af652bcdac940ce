"""The model gate: a request that needs the model waits briefly for a live worker that has it loaded."""

from __future__ import annotations

import time
from weakref import WeakKeyDictionary

from common.bus import TokenBus
from common.errors import ApiError
from common.schemas import WorkerStatus

POLL_S = 0.2
# A ready worker seen this recently is trusted without reading every heartbeat again (a Redis SCAN and a parse
# per submission, a sixth of its CPU). A dead worker's liveness mark lapses in seconds anyway (``liveness_ttl_s``),
# so this adds at most a second to how long the gate takes to notice; its jobs wait queued for the next worker.
READY_CACHE_S = 1.0
_ready: WeakKeyDictionary[TokenBus, tuple[float, WorkerStatus]] = WeakKeyDictionary()  # per bus: until, worker


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
    cached = _ready.get(bus)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    deadline = time.monotonic() + wait_s
    while True:
        workers = bus.workers()
        ready = ready_workers(workers)
        if ready:
            _ready[bus] = (time.monotonic() + READY_CACHE_S, ready[0])
            return ready[0]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ApiError("model_not_loaded", f"The model is not loaded: {not_loaded_reason(workers)}.")
        time.sleep(min(POLL_S, remaining))
