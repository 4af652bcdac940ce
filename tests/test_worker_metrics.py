"""A worker's /metrics, scraped over HTTP from a real WorkerService running the demo model: vLLM's names, labels and
buckets, and counts that agree with the stored job rows."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import select

from common import jobs
from common.config import Settings
from common.jobspec import JobSpec, SamplingSpec, StopSpec, TurnSpec
from common.models import Job
from common.queue import make_celery
from devtools.databases import migrate
from devtools.live import free_port
from tests.conftest import store_queued_job
from worker.engine import Engine, GenerationResult, ModelInfo
from worker.metrics import PrometheusMetrics, WorkerMetrics
from worker.service import WorkerService

REDIS_URL = "redis://127.0.0.1:6379/13"  # a DB of its own: the fixture flushes it
MakeService = Callable[..., WorkerService]

# vLLM's contract, written out here rather than imported from the code under test.
REQUEST_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0]
TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
        160.0, 640.0, 2560.0]
ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
VLLM_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
}
VLLM_REASONS = {"stop": "stop", "length": "length", "time_limit": "length"}


@pytest.fixture
def make_service(tmp_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeService]:
    """Build and start() WorkerServices over one fresh SQLite file; the model "loads" as the session's demo engine."""
    monkeypatch.setattr("worker.loader.load_engine", lambda _settings: engine)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    redis.Redis.from_url(REDIS_URL).flushdb()
    started: list[WorkerService] = []

    def make(worker_id: str, **overrides: object) -> WorkerService:
        settings = Settings(model="demo", device="cpu", hf_offline=True, data_dir=tmp_path, database_url=url,
                            redis_url=REDIS_URL, worker_id=worker_id, heartbeat_s=3600, reaper_interval_s=3600,
                            **overrides)
        service = WorkerService(settings, make_celery(settings))
        started.append(service)
        service.start()
        return service

    yield make
    for service in started:
        service.stop()


def _scrape(port: int | None) -> dict[str, list[Sample]]:
    """GET /metrics and return each family's samples by family name (a counter's family drops ``_total``)."""
    assert port is not None
    reply = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert reply.status_code == 200
    families = list(text_string_to_metric_families(reply.text))
    types = {family.name: family.type for family in families}
    for name, kind in VLLM_METRICS.items():
        assert types.get(name) == kind, f"{name} should be a {kind}"
    return {family.name: family.samples for family in families}


def _value(samples: dict[str, list[Sample]], family: str, sample: str, **labels: str) -> float:
    """Return the value of the one sample with this name and these labels."""
    found = [s.value for s in samples[family] if s.name == sample and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{sample}{labels}: {len(found)} samples"
    return found[0]


def _buckets(samples: dict[str, list[Sample]], family: str) -> list[float]:
    """Return a histogram's finite bucket bounds."""
    bounds = [float(s.labels["le"]) for s in samples[family] if s.name == f"{family}_bucket"]
    assert bounds[-1] == math.inf
    return bounds[:-1]


def _rows(service: WorkerService) -> list[Job]:
    with service.db() as db:
        return list(db.scalars(select(Job).where(Job.worker_id == service.worker_id)))


def test_a_worker_reports_its_jobs_as_vllm_does(make_service: MakeService, engine: Engine):
    service = make_service("metrics-a", metrics_port=free_port())
    with service.db() as db:
        plain = [store_queued_job(db, max_tokens=6) for _ in range(4)]
        cancelled = store_queued_job(db, max_tokens=6)
        failed = store_queued_job(db, spec=JobSpec(turns=[TurnSpec(role="user", text="see", image_ids=["img_gone"])])
                                  .stored())
    service.bus.request_cancel(cancelled)  # raised before it runs: stopped at its first step, before any token
    for job_id in [*plain, cancelled, failed]:
        service.run_job(job_id)  # the first runs them all in one decode batch
    rows = _rows(service)
    assert Counter(j.status for j in rows) == {"succeeded": 4, "cancelled": 1, "failed": 1}
    served = [j for j in rows if j.status != "failed"]
    samples = _scrape(service.metrics.port)

    # Names, types (checked by _scrape) and the model_name label, exactly as vLLM's dashboards query them.
    for family in VLLM_METRICS:
        assert samples[family] and all(s.labels["model_name"] == "demo" for s in samples[family])
    assert {s.name for s in samples["vllm:prompt_tokens"]} >= {"vllm:prompt_tokens_total"}
    assert {s.name for s in samples["vllm:request_success"]} >= {"vllm:request_success_total"}

    # Counters agree with the stored rows.
    by_reason = Counter("abort" if j.status == "cancelled" else VLLM_REASONS[j.finish_reason] for j in served)
    assert by_reason["abort"] == 1
    for reason in ("stop", "length", "abort"):
        assert _value(samples, "vllm:request_success", "vllm:request_success_total",
                      finished_reason=reason) == by_reason[reason]
    assert _value(samples, "vllm:generation_tokens", "vllm:generation_tokens_total") == \
        sum(j.completion_tokens or 0 for j in rows) > 0
    assert _value(samples, "vllm:prompt_tokens", "vllm:prompt_tokens_total") == sum(j.prompt_tokens for j in served)
    for status, count in {"succeeded": 4, "cancelled": 1, "failed": 1}.items():
        assert _value(samples, "vlgate_worker_jobs", "vlgate_worker_jobs_total", status=status) == count

    # One observation per finished request; the cancelled one had no first token, so no TTFT, prefill or decode.
    for family in ("vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                   "vllm:request_inference_time_seconds", "vllm:request_prompt_tokens",
                   "vllm:request_generation_tokens"):
        assert _value(samples, family, f"{family}_count") == len(served)
    with_token = [j for j in served if j.first_token_at is not None]
    assert len(with_token) == len(served) - 1
    for family in ("vllm:time_to_first_token_seconds", "vllm:request_prefill_time_seconds",
                   "vllm:request_decode_time_seconds"):
        assert _value(samples, family, f"{family}_count") == len(with_token)
    assert _value(samples, "vllm:request_generation_tokens", "vllm:request_generation_tokens_sum") == \
        sum(j.completion_tokens for j in served)
    assert _value(samples, "vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_sum") == \
        pytest.approx(sum(j.timings["finished_at"] - j.timings["queued_at"] for j in served))
    assert _value(samples, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_sum") == \
        pytest.approx(sum(j.timings["first_token_at"] - j.timings["queued_at"] for j in with_token))
    # One inter-token gap per token after a row's first: every row's tokens, less one per row that had any.
    assert _value(samples, "vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count") == \
        sum(j.completion_tokens - 1 for j in with_token)

    # Gauges after the run.
    assert _value(samples, "vllm:num_requests_running", "vllm:num_requests_running") == 0
    assert _value(samples, "vllm:num_requests_waiting", "vllm:num_requests_waiting") == 0
    assert _value(samples, "vlgate_worker_up", "vlgate_worker_up") == 1
    assert _value(samples, "vlgate_worker_model_loaded", "vlgate_worker_model_loaded") == 1
    assert _value(samples, "vlgate_worker_info", "vlgate_worker_info")  # carries the labels below
    assert [s.labels["worker_id"] for s in samples["vlgate_worker_info"]] == ["metrics-a"]

    # vLLM's bucket boundaries; token counts in 1-2-5 steps up to the model's context.
    assert _buckets(samples, "vllm:time_to_first_token_seconds") == TTFT
    assert _buckets(samples, "vllm:inter_token_latency_seconds") == ITL
    for family in ("vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                   "vllm:request_inference_time_seconds", "vllm:request_prefill_time_seconds",
                   "vllm:request_decode_time_seconds"):
        assert _buckets(samples, family) == REQUEST_LATENCY
    context = engine.info.max_context
    tokens = [m * 10**e for e in range(12) for m in (1, 2, 5) if m * 10**e <= context]
    assert tokens[:7] == [1, 2, 5, 10, 20, 50, 100]
    assert _buckets(samples, "vllm:request_prompt_tokens") == tokens
    assert _buckets(samples, "vllm:request_generation_tokens") == tokens


def test_each_choice_is_an_engine_request(make_service: MakeService):
    service = make_service("metrics-n", metrics_port=free_port())
    with service.db() as db:
        spec = JobSpec(turns=[TurnSpec(role="user", text="three")], sampling=SamplingSpec(n=3),
                       stop=StopSpec(max_tokens=5))
        job_id = store_queued_job(db, spec=spec.stored())
    assert service.run_job(job_id) == "succeeded"
    [job] = _rows(service)
    choices = job.choices or []
    assert len(choices) == 3
    samples = _scrape(service.metrics.port)
    by_reason = Counter(VLLM_REASONS[c["finish_reason"]] for c in choices)
    for reason in ("stop", "length", "abort"):
        assert _value(samples, "vllm:request_success", "vllm:request_success_total",
                      finished_reason=reason) == by_reason[reason]
    assert _value(samples, "vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count") == 3
    assert _value(samples, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 3
    assert _value(samples, "vllm:generation_tokens", "vllm:generation_tokens_total") == job.completion_tokens == \
        sum(c["completion_tokens"] for c in choices)
    assert _value(samples, "vllm:prompt_tokens", "vllm:prompt_tokens_total") == 3 * job.prompt_tokens  # 3 prefills
    assert _value(samples, "vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count") == \
        sum(c["completion_tokens"] - 1 for c in choices)
    assert _value(samples, "vlgate_worker_jobs", "vlgate_worker_jobs_total", status="succeeded") == 1


def test_workers_on_one_host_take_different_ports(make_service: MakeService):
    base = free_port()
    first = make_service("metrics-a", metrics_port=base)
    second = make_service("metrics-b", metrics_port=base)
    assert first.metrics.port == base
    assert second.metrics.port is not None and base < second.metrics.port < base + 64
    for service in (first, second):
        samples = _scrape(service.metrics.port)
        assert [s.labels["worker_id"] for s in samples["vlgate_worker_info"]] == [service.worker_id]
    first.stop()  # the port is free again for the next worker
    assert first.metrics.port is None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{base}/metrics", timeout=5)


@pytest.mark.parametrize("port", [0, None])
def test_metrics_can_be_switched_off(make_service: MakeService, port: int | None):
    service = make_service("metrics-off", metrics_port=port)
    assert type(service.metrics) is WorkerMetrics and service.metrics.port is None  # records and serves nothing
    with service.db() as db:
        job_id = store_queued_job(db, max_tokens=4)
    assert service.run_job(job_id) == "succeeded"


class _Broken:
    """An engine whose generate raises ``error`` (the demo model's facts otherwise)."""

    def __init__(self, info: ModelInfo, error: Exception) -> None:
        self.info, self.error = info, error

    def generate(self, *args: object, **kwargs: object) -> list:
        raise self.error


def test_faults_and_the_reaper_are_counted(make_service: MakeService, engine: Engine):
    service = make_service("metrics-r", metrics_port=free_port(), max_attempts=2)
    registry = service.metrics.registry

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    with service.db() as db:
        job_id = store_queued_job(db, max_tokens=4)
    service.engine = _Broken(engine.info, ValueError("a bug this job meets"))
    assert service.run_job(job_id) == "failed"
    service.engine = _Broken(engine.info, redis.ConnectionError("Connection refused"))
    with service.db() as db:
        job_id = store_queued_job(db, max_tokens=4)
    assert service.run_job(job_id) is None  # handed back; Redis answers, so the wait is short
    assert value("vlgate_worker_faults_total", kind="job") == 1
    assert value("vlgate_worker_faults_total", kind="infrastructure") == 1
    assert value("vlgate_worker_faults_total", kind="device") == 0
    assert value("vlgate_worker_jobs_total", status="failed") == 1

    with service.db() as db:  # a dead worker held two jobs: one has an attempt left, one has not
        again, lost = store_queued_job(db, max_tokens=4), store_queued_job(db, max_tokens=4, attempts=1)
        for held in (again, lost):
            assert jobs.claim(db, held, "ghost", lease_s=-1, max_attempts=2) is not None
    found = service.reap()
    assert [j for j, _ in found.requeue] == [again] and found.failed == [lost]
    assert value("vlgate_reaper_requeued_total") == 1
    assert value("vlgate_jobs_worker_lost_total") == 1


def _metrics() -> PrometheusMetrics:
    metrics = PrometheusMetrics(Settings(model="some/checkpoint", served_model_name="vl", metrics_port=1), "w")
    metrics.model_loaded(ModelInfo("m", "m", "m", False, "cpu", "float32", 1, max_context=100))
    return metrics


def test_finish_reasons_map_to_vllms_and_the_served_name_labels_them():
    metrics = _metrics()
    timings = {"queued_at": 10.0, "started_at": 11.0, "first_token_at": 11.5, "finished_at": 13.0}
    metrics.row_finished(GenerationResult("j#0", "", "time_limit", 4, 7, timings))
    metrics.row_finished(GenerationResult("k#0", "", "cancelled", 4, 2, timings))
    metrics.row_finished(GenerationResult("l#0", "", "error", 4, 0, {}, "context_length_exceeded", "too long"))
    metrics.job_finished("failed")

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"model_name": "vl", **labels})

    assert value("vllm:request_success_total", finished_reason="length") == 1
    assert value("vllm:request_success_total", finished_reason="abort") == 1
    assert value("vllm:request_success_total", finished_reason="stop") == 0
    assert value("vllm:e2e_request_latency_seconds_sum") == 6.0  # 3 s each, from arrival
    assert value("vllm:request_queue_time_seconds_sum") == 2.0
    assert value("vllm:time_to_first_token_seconds_sum") == 3.0  # 1.5 s each, from arrival
    assert value("vllm:request_prefill_time_seconds_sum") == 1.0
    assert value("vllm:request_decode_time_seconds_sum") == 3.0
    assert value("vllm:request_inference_time_seconds_sum") == 4.0
    assert value("vllm:generation_tokens_total") == 9
    assert value("vllm:prompt_tokens_total") == 8  # the failed row never ran
    assert metrics.registry.get_sample_value("vlgate_worker_jobs_total", {"status": "failed"}) == 1
    assert value("vllm:request_generation_tokens_bucket", le="5.0") == 1
    assert value("vllm:request_generation_tokens_bucket", le="100.0") == 2
    assert value("vllm:request_generation_tokens_bucket", le="+Inf") == 2


def test_decode_steps_time_rows_that_got_a_token():
    metrics = _metrics()

    def value(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"model_name": "vl"})

    steps = metrics.decode_steps()
    steps.admitted(2)
    assert value("vllm:num_requests_waiting") == 2
    steps.tick(["a#0", "b#0"], set())  # after the prefill: first tokens come now, no gap yet
    assert value("vllm:num_requests_waiting") == 0 and value("vllm:num_requests_running") == 2
    assert value("vllm:inter_token_latency_seconds_count") == 0
    steps.tick(["a#0", "b#0", "c#0"], {"b#0"})  # c just joined; b is cancelled and gets no token
    assert value("vllm:inter_token_latency_seconds_count") == 1 and value("vllm:num_requests_running") == 2
    steps.tick(["a#0", "c#0"], set())
    assert value("vllm:inter_token_latency_seconds_count") == 3
    steps.close()
    assert value("vllm:num_requests_running") == 0
