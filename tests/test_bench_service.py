"""The service benchmark's core on a real private stack with tiny numbers."""

from __future__ import annotations

import pytest

from bench.service import PHASES, print_report, run_benchmark

pytestmark = pytest.mark.slow


def test_run_benchmark_measures_both_paths_and_acceptance(engine, data_dir, capsys):
    header, latency, acceptance = run_benchmark(engine, data_dir, count=3, warmup=1, tokens=4, submits=10, clients=2)
    assert len(latency.e2e_ms) == len(latency.inproc_ms) == 3
    assert all(v > 0 for v in [*latency.e2e_ms, *latency.inproc_ms, *latency.inproc_generation_ms])
    assert latency.overhead_ms == [e - i for e, i in zip(latency.e2e_ms, latency.inproc_ms, strict=True)]
    for phase in PHASES:
        assert len(latency.phases_ms[phase]) == 3 and all(v > 0 for v in latency.phases_ms[phase])
    assert acceptance.accepted == len(acceptance.latencies_ms) == 10
    assert acceptance.wall_s > 0 and all(ms > 0 for ms in acceptance.latencies_ms)
    assert 0 <= acceptance.cancelled <= 10
    assert "demo" in header["model"] and "gunicorn" in header["web"]
    print_report(header, latency, acceptance, tokens=4)
    out = capsys.readouterr().out
    assert "overhead: e2e - in process" in out and "jobs/s" in out
