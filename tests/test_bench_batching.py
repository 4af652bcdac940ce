"""The batching benchmark's core on a real private stack with tiny numbers."""

from __future__ import annotations

import pytest

from bench.batching import print_report, run_benchmark

pytestmark = pytest.mark.slow


def test_run_benchmark_measures_batched_throughput_and_chat_ttft_under_a_batch(engine, data_dir, capsys):
    result = run_benchmark(engine, data_dir, jobs=8, tokens=8, batch_items=40, batch_tokens=32, turns=3,
                           chat_tokens=4, gap_s=0.1, max_batch=8, chat_reserve=4)
    service, own, alone = result["throughput"]
    assert service.label == "service, MAX_BATCH=8" and "one at a time" in alone.label
    assert own.label == "in process, engine.generate in batches of 8" and own.overlap == 8
    for row in (service, own, alone):
        assert row.items == 8 and row.tokens == 64 and row.wall_s > 0 and row.items_per_s > 0
    assert service.tokens_per_s / alone.tokens_per_s > 0
    assert service.overlap > 1  # the jobs really generated together
    for ttft in (result["idle"], result["busy"]):
        assert len(ttft.client_ms) == len(ttft.queue_ms) == len(ttft.worker_ms) == 3
        assert all(ms > 0 for ms in [*ttft.client_ms, *ttft.queue_ms, *ttft.worker_ms])
    before, after = result["competition"]["before"], result["competition"]["after"]
    assert before["running"] > 0 and after["succeeded"] >= before["succeeded"]
    assert sum(after.values()) == 40
    assert "demo" in result["header"]["model"] and "MAX_BATCH=8" in result["header"]["scheduler"]
    print_report(result, tokens=8, batch_items=40, batch_tokens=32, chat_tokens=4, gap_s=0.1)
    out = capsys.readouterr().out
    assert "throughput vs one at a time in process" in out and "busy/idle median" in out
    assert "the engine's own batches of the same size" in out
