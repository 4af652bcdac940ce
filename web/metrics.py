"""The web's ``/metrics``: gateway metrics ``vlgate_*``, correct under gunicorn's several worker processes.

Counters and histograms that requests update live in prometheus-client's multi-process files when
``PROMETHEUS_MULTIPROC_DIR`` is set (``gunicorn.conf.py`` sets it before any worker starts and wipes it
at start-up), so any process answers a scrape with every process's counts. What the database and Redis
already know (queue depths, jobs and batch items by status, workers) is read at scrape time instead of
being counted twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import redis
from flask import Blueprint, Flask, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from common.images import NormalizedImage
from common.models import Job
from common.queue import queue_depths
from web.extensions import Services, services

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)

REFUSED = Counter("vlgate_requests_refused", "Requests answered with an error, by reason and error code.",
                  ["reason", "code"])
IMAGE_BYTES = Histogram("vlgate_image_bytes", "Stored (normalised PNG) size of accepted images.",
                        buckets=[2**k for k in range(10, 25, 2)])
IMAGE_PIXELS = Histogram("vlgate_image_pixels", "Pixels of accepted images as sent, before any downscaling.",
                         buckets=[64 * 64, 256 * 256, 512 * 512, 1024 * 1024, 2048 * 2048, 4096 * 4096, 8192 * 8192])
DOWNSCALED = Counter("vlgate_images_downscaled", "Accepted images that were larger than VLGATE_MAX_IMAGE_PIXELS.")
FOLLOWERS = Gauge("vlgate_stream_followers", "Clients following job streams now, by kind (websocket, sse).",
                  ["kind"], multiprocess_mode="livesum")


def refusal_reason(status: int) -> str:
    """Group an error status into the reasons an operator watches."""
    if status in (401, 403):
        return "auth"
    if status == 429:
        return "rate_limit"
    if status == 503:
        return "unavailable"
    return "bad_input" if status < 500 else "server_error"


def count_refusal(status: int, code: str) -> None:
    """Count one error answer."""
    REFUSED.labels(refusal_reason(status), code).inc()


def observe_image(image: NormalizedImage) -> None:
    """Record an accepted image's size and whether it was downscaled."""
    IMAGE_BYTES.observe(len(image.data))
    IMAGE_PIXELS.observe(image.original_width * image.original_height)
    if image.width * image.height < image.original_width * image.original_height:
        DOWNSCALED.inc()


class StateCollector(Collector):
    """Read queue depths, jobs and batch items by status, and workers from Redis and the database per scrape."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the gauges; a backing service that does not answer leaves its gauges out of this scrape."""
        try:
            depths = GaugeMetricFamily("vlgate_queue_depth", "Tasks waiting on each broker queue.", labels=["queue"])
            for queue, depth in queue_depths(self.svc.celery).items():
                depths.add_metric([queue], depth)
            yield depths
            workers = self.svc.bus.workers()
            up = GaugeMetricFamily("vlgate_workers", "Live workers by state.", labels=["state"])
            for state in ("loading", "idle", "busy", "error"):
                up.add_metric([state], sum(w.state == state for w in workers))
            yield up
            yield GaugeMetricFamily("vlgate_workers_model_loaded", "Live workers with the model loaded.",
                                    value=sum(w.loaded for w in workers))
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: Redis unavailable: %s", exc)
        try:
            with self.svc.session_factory() as db:
                jobs = db.execute(select(Job.status, Job.batch_id.is_(None), func.count())
                                  .group_by(Job.status, Job.batch_id.is_(None))).all()
        except SQLAlchemyError as exc:
            log.warning("metrics: database unavailable: %s", exc)
            return
        by_status = GaugeMetricFamily("vlgate_jobs", "Jobs by status (batch items included).", labels=["status"])
        items = GaugeMetricFamily("vlgate_batch_items", "Batch items by status.", labels=["status"])
        totals: dict[str, int] = {}
        for status, single, count in jobs:
            totals[status] = totals.get(status, 0) + count
            if not single:
                items.add_metric([status], count)
        for status, count in totals.items():
            by_status.add_metric([status], count)
        yield by_status
        yield items


def _registry(svc: Services) -> CollectorRegistry:
    """Build the registry one scrape reads: every process's counters, plus the live state."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # set by gunicorn.conf.py before prometheus_client loads
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:  # one process (the development server, tests): the counters live in the default registry
        registry = CollectorRegistry()
        registry.register(_Default())
    registry.register(StateCollector(svc))
    return registry


class _Default(Collector):
    """Expose the default registry's metrics inside a per-scrape registry."""

    def collect(self) -> Iterator:
        yield from REGISTRY.collect()


@bp.get("/metrics")
def metrics() -> Response:
    """Answer Prometheus's scrape in its text format."""
    return Response(generate_latest(_registry(services())), mimetype=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> None:
    """Register ``/metrics``."""
    app.register_blueprint(bp)
