"""Tell apart the three kinds of failure a worker meets, because each needs a different cure.

- ``device``: the GPU (a CUDA error, out of memory). The worker frees memory and checks itself; if the
  device stays broken it exits non-zero so its supervisor starts a fresh process.
- ``infrastructure``: Redis, the broker or the database did not answer. Nothing is wrong with the
  worker or the jobs: the jobs go back to the queue and the worker waits, with backoff, for the
  service to return. It never marks itself unhealthy for this.
- ``job``: anything else, a bug met by particular jobs. Those jobs fail with their error; the worker
  carries on.
"""

from __future__ import annotations

from typing import Literal

import redis
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import DBAPIError, OperationalError

FaultKind = Literal["device", "infrastructure", "job"]


def device_fault(exc: BaseException) -> bool:
    """Tell a GPU fault (the worker must heal or be restarted) from everything else."""
    return "CUDA" in str(exc) or type(exc).__name__ in ("OutOfMemoryError", "AcceleratorError")


def infrastructure_fault(exc: BaseException) -> bool:
    """Tell whether Redis, the broker or the database failed (a blip, not the worker's or the job's fault)."""
    if isinstance(exc, redis.RedisError | BrokerError | OperationalError | ConnectionError | TimeoutError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def classify(exc: BaseException) -> FaultKind:
    """Return which kind of failure an exception is (see the module docstring)."""
    if device_fault(exc):
        return "device"
    if infrastructure_fault(exc):
        return "infrastructure"
    return "job"
