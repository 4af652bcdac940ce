"""The service benchmark's core on a real private stack with tiny numbers."""

from __future__ import annotations

import pytest

from bench.service import PHASES, Stack, print_metrics_cost, print_report, run_benchmark, run_metrics_compare

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


def test_metrics_off_stack_gives_its_worker_port_0_and_the_on_stack_a_port(data_dir, tmp_path):
    for name in ("on", "off"):
        (tmp_path / name).mkdir()
    stacks = [Stack(data_dir, tmp_path / name, "sqlite", metrics) for name, metrics in (("on", True), ("off", False))]
    try:
        on, off = (stack.services[2].env["VLGATE_METRICS_PORT"] for stack in stacks)
        assert off == "0" and int(on) == stacks[0].metrics_port > 0 and stacks[1].metrics_port is None
    finally:
        for stack in stacks:
            stack.stop()


@pytest.mark.soak  # two whole deployments, ~35 s: run by `make faults` with the other long runs
def test_metrics_compare_alternates_rounds_and_only_the_on_side_records(engine, data_dir, capsys):
    cost = run_metrics_compare(data_dir, rounds=2, count=2, warmup=1, tokens=4)
    assert [len(r) for r in cost.on] == [len(r) for r in cost.off] == [2, 2]
    assert all(ms > 0 for ms in sum(cost.on + cost.off, []))
    # Every chat of the on side was counted by its worker, before and after the crossover: 2 x (1 warmup + 2) chats
    # x 4 tokens.
    assert cost.tokens_counted == 24 and cost.port
    low, high = cost.interval()
    assert low <= high and len(cost.round_ratios) == 2
    print_metrics_cost(cost)
    out = capsys.readouterr().out
    assert f"ratio on/off = {cost.ratio:.3f}" in out and "over 2 rounds" in out
