"""A worker's Prometheus metrics: vLLM's engine metrics (its names, buckets and ``model_name`` label, so vLLM's
dashboards work unchanged) and vlgate's own worker metrics, served on the worker's own port.

``make_metrics`` returns the no-op ``WorkerMetrics`` when ``metrics_port`` is 0 or empty: nothing is recorded and
nothing listens, which is also how a benchmark measures what the instrumentation costs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

from common.config import Settings
from worker.generation import GenerationResult, ModelInfo

log = logging.getLogger(__name__)

LISTEN_ADDR = "0.0.0.0"  # every interface: Prometheus scrapes workers on other hosts
PORT_TRIES = 64  # workers on one host take metrics_port, metrics_port + 1, ... (one per GPU)

# vLLM v1's bucket boundaries (vllm/v1/metrics/buckets.py).
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                               20.0, 40.0, 80.0)
# vLLM's finished_reason values; a row's own reasons map onto them (a runaway cut by max_job_s ran out of length).
FINISHED_REASONS = {"stop": "stop", "length": "length", "time_limit": "length", "cancelled": "abort"}
JOB_STATUSES = ("succeeded", "failed", "cancelled")
FAULT_KINDS = ("device", "infrastructure", "job")


def token_buckets(max_context: int) -> list[int]:
    """Return vLLM's 1-2-5 series of token-count buckets up to the model's context (build_1_2_5_buckets)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_context:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


class DecodeSteps:
    """Time a generation's decoding steps; this base records nothing (metrics off)."""

    def admitted(self, rows: int) -> None:
        """Rows were claimed and wait for their prefill."""

    def tick(self, row_ids: Collection[str], stopped: Collection[str]) -> None:
        """Note one decoding step: the rows about to get a token, less those stopping now."""

    def close(self) -> None:
        """The generation is over: no row runs any more."""


class WorkerMetrics:
    """What the runner and the service report; this base records nothing and serves nothing (metrics off)."""

    port: int | None = None  # where /metrics listens, once served

    def serve(self) -> int | None:
        """Start serving /metrics; return the port taken (None: not served)."""
        return None

    def close(self) -> None:
        """Stop serving /metrics."""

    def decode_steps(self) -> DecodeSteps:
        """Return the step timer of one generation."""
        return DecodeSteps()

    def model_loaded(self, info: ModelInfo) -> None:
        """The model is loaded and the worker takes jobs."""

    def row_finished(self, result: GenerationResult) -> None:
        """One row (one choice of a job this worker holds) finished: an engine request, as vLLM counts them."""

    def job_finished(self, status: str) -> None:
        """A job's outcome (succeeded, failed, cancelled) was stored by this worker."""

    def fault(self, kind: str) -> None:
        """A failure of this kind (worker.faults.classify) was handled."""

    def reaped(self, requeued: int, lost: int) -> None:
        """A reaper pass re-queued orphaned jobs and failed those whose worker was lost too often."""

    def device_memory(self, device: str | None, used_mb: float | None, total_mb: float | None) -> None:
        """Report the device's memory (MiB, as the heartbeat has it); None on the CPU."""


class PrometheusMetrics(WorkerMetrics):
    """The metrics of one worker process, in a registry of its own."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self.model_name = settings.served_model_name or settings.model
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._server: WSGIServer | None = None
        self._engine: _EngineMetrics | None = None  # built when the model is loaded (its buckets need its context)
        self._info = Info("vlgate_worker", "This worker process.", registry=self.registry)
        self._info.info({"worker_id": worker_id, "model_name": self.model_name})
        self._worker_id = worker_id
        Gauge("vlgate_worker_up", "1 while this worker process runs.", registry=self.registry).set(1)
        self._loaded = Gauge("vlgate_worker_model_loaded", "1 once the model is loaded and jobs are taken.",
                             registry=self.registry)
        self._memory_used = Gauge("vlgate_worker_device_memory_used_bytes", "Memory in use on the worker's GPU.",
                                  ["device"], registry=self.registry)
        self._memory_total = Gauge("vlgate_worker_device_memory_total_bytes", "Memory of the worker's GPU.",
                                   ["device"], registry=self.registry)
        jobs_total = Counter("vlgate_worker_jobs", "Jobs whose outcome this worker stored, by final status.",
                             ["status"], registry=self.registry)
        self._jobs = {status: jobs_total.labels(status) for status in JOB_STATUSES}
        faults = Counter("vlgate_worker_faults", "Failures this worker handled, by kind (device, infrastructure, "
                                                 "job).", ["kind"], registry=self.registry)
        self._faults = {kind: faults.labels(kind) for kind in FAULT_KINDS}
        self._requeued = Counter("vlgate_reaper_requeued", "Orphaned jobs (their worker died or its lease ran out) "
                                                           "this worker's reaper put back on the queue.",
                                 registry=self.registry)
        self._lost = Counter("vlgate_jobs_worker_lost", "Jobs this worker's reaper failed with worker_lost (out of "
                                                        "attempts).", registry=self.registry)

    # -- serving ----------------------------------------------------------------------------------
    def serve(self) -> int | None:
        """Listen on metrics_port, or the next free one of PORT_TRIES (several workers share a host)."""
        first = self.settings.metrics_port or 0
        for port in range(first, min(first + PORT_TRIES, 65536)):
            try:
                self._server, _ = start_http_server(port, addr=LISTEN_ADDR, registry=self.registry)
            except OSError:
                continue
            self.port = port
            log.info("worker %s serves /metrics on port %d", self._worker_id, port)
            return port
        log.warning("no free port in %d-%d: this worker serves no /metrics", first, first + PORT_TRIES - 1)
        return None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server, self.port = None, None

    # -- engine -----------------------------------------------------------------------------------
    def model_loaded(self, info: ModelInfo) -> None:
        if self._engine is None:
            self._engine = _EngineMetrics(self.registry, self.model_name, info.max_context)
        self._info.info({"worker_id": self._worker_id, "model_name": self.model_name, "device": info.device,
                         "model": info.label, "is_demo": str(info.is_demo).lower()})
        self._loaded.set(1)

    def decode_steps(self) -> DecodeSteps:
        return _StepTimer(self._engine) if self._engine is not None else DecodeSteps()

    def row_finished(self, result: GenerationResult) -> None:
        # A row that failed (a prompt that could not be built or did not fit, a grammar that did not compile, a
        # sampling error) is left out: vLLM refuses such requests before its engine. Its job is counted failed.
        if self._engine is not None and result.finish_reason != "error":
            self._engine.finished(result)

    def job_finished(self, status: str) -> None:
        counter = self._jobs.get(status)
        if counter is not None:
            counter.inc()

    # -- worker -----------------------------------------------------------------------------------
    def fault(self, kind: str) -> None:
        self._faults[kind].inc()

    def reaped(self, requeued: int, lost: int) -> None:
        self._requeued.inc(requeued)
        self._lost.inc(lost)

    def device_memory(self, device: str | None, used_mb: float | None, total_mb: float | None) -> None:
        if device is None or used_mb is None or total_mb is None:
            return
        self._memory_used.labels(device).set(used_mb * 2**20)
        self._memory_total.labels(device).set(total_mb * 2**20)


class _EngineMetrics:
    """vLLM's engine metrics, labelled with the served model's name."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_context: int) -> None:
        def histogram(name: str, doc: str, buckets: tuple[float, ...] | list[int]) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=registry).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["model_name"], registry=registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            # prometheus_client adds "_total": vllm:prompt_tokens is exposed as vllm:prompt_tokens_total.
            return Counter(name, doc, ["model_name"], registry=registry).labels(model_name)

        tokens = token_buckets(max_context)
        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        # vLLM's "waiting" is requests its engine holds but has not scheduled: here the rows this worker claimed
        # and has not prefilled yet (a worker prefills what it claims at once, so this is mostly 0). Not the
        # shared queue's backlog: every worker would report it and sum(), which dashboards and autoscalers use,
        # would multiply it. The web reports the queues (vlgate_queue_depth).
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.cache_queries = counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of "
                                     "queried tokens.")
        self.cache_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          ["model_name", "finished_reason"], registry=registry)
        self.success = {reason: success.labels(model_name, reason) for reason in sorted(set(FINISHED_REASONS.values()))}
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TIME_TO_FIRST_TOKEN_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             INTER_TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.inference = histogram("vllm:request_inference_time_seconds",
                                   "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prefill = histogram("vllm:request_prefill_time_seconds",
                                 "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.decode = histogram("vllm:request_decode_time_seconds",
                                "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prompt_lengths = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", tokens)
        self.generation_lengths = histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                            tokens)

    def finished(self, result: GenerationResult) -> None:
        """Observe a finished row as vLLM observes a finished request (its timings are epoch seconds)."""
        self.success[FINISHED_REASONS.get(result.finish_reason, "stop")].inc()
        # Each row prefilled the prompt itself: n choices are n prompts' work, as n requests are in vLLM.
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generation_tokens.inc(result.completion_tokens)
        self.cache_queries.inc(result.prompt_tokens)
        self.cache_hits.inc(result.cached_tokens)
        self.prompt_lengths.observe(result.prompt_tokens)
        self.generation_lengths.observe(result.completion_tokens)
        t = result.timings
        queued, started, first, done = (t.get(k) for k in ("queued_at", "started_at", "first_token_at", "finished_at"))
        if queued is not None and started is not None and done is not None:
            self.e2e.observe(done - queued)
            self.queue.observe(started - queued)
        if started is not None and done is not None:
            self.inference.observe(done - started)
        if first is None:  # cancelled before its first token: it had no prefill that ended, nor a decode
            return
        if queued is not None:
            self.ttft.observe(first - queued)  # from arrival (the job's creation), as vLLM measures it
        if started is not None:
            self.prefill.observe(first - started)
        if done is not None:
            self.decode.observe(done - first)


class _StepTimer(DecodeSteps):
    """Observe inter-token latency once per row per decoding step, and the rows running.

    The engine samples exactly one token per running row per step, and the runner's cancel check runs once per
    step just before: a row that was running at the previous check got a token then and gets its next one now,
    so the gap between two checks is that row's inter-token latency. (Text deltas would be a worse clock: a delta
    can carry several tokens, or none while a stop string or a UTF-8 character is held back.) One clock read and
    one observation per row per step; the step includes admitting and prefilling new rows, as vLLM's does.
    """

    def __init__(self, engine: _EngineMetrics) -> None:
        self.engine = engine
        self._at = 0.0
        self._rows: frozenset[str] = frozenset()

    def admitted(self, rows: int) -> None:
        self.engine.waiting.set(rows)

    def tick(self, row_ids: Collection[str], stopped: Collection[str]) -> None:
        now = time.monotonic()
        gap = now - self._at
        running = [rid for rid in row_ids if rid not in stopped]
        for rid in running:
            if rid in self._rows:
                self.engine.itl.observe(gap)
        self._at, self._rows = now, frozenset(running)
        self.engine.running.set(len(running))
        self.engine.waiting.set(0)  # whatever was admitted is prefilled by the time the step's check runs

    def close(self) -> None:
        self._rows = frozenset()
        self.engine.running.set(0)
        self.engine.waiting.set(0)


def make_metrics(settings: Settings, worker_id: str) -> WorkerMetrics:
    """Return the worker's metrics: Prometheus ones, or the no-op base when metrics_port is 0 or empty."""
    return PrometheusMetrics(settings, worker_id) if settings.metrics_port else WorkerMetrics()
