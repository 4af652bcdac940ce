"""The stream benchmark's core on a real private stack with tiny numbers."""

from __future__ import annotations

import pytest

from bench.stream import FIRST, SSE_FIRST, WS_FIRST, print_report, run_benchmark

pytestmark = pytest.mark.slow


def test_run_benchmark_times_first_tokens_and_matches_every_frame_to_redis(data_dir, capsys):
    header, first, relays = run_benchmark(data_dir, turns=3, warmup=1, turn_tokens=4, streams=2, stream_tokens=32,
                                          workers=2)
    assert list(first) == FIRST and all(len(v) == 3 for v in first.values())
    for row in FIRST[:3]:  # client TTFT, worker TTFT, first-token relay: whole spans on one clock
        assert all(ms > 0 for ms in first[row]), (row, first[row])
    assert FIRST == WS_FIRST + SSE_FIRST and len(set(FIRST)) == len(FIRST)  # the same turn over /v1 SSE, own rows
    for row in SSE_FIRST[:3]:  # the /v1 twin of each turn, cut by the same clocks
        assert all(ms > 0 for ms in first[row]), (row, first[row])
    assert [r.streams for r in relays] == [1, 2]
    for relay in relays:
        assert relay.missing == 0  # every token frame on the websocket was seen on Redis first
        assert len(relay.lags_ms) >= relay.streams * 16 and sorted(relay.lags_ms)[len(relay.lags_ms) // 2] > 0
        assert relay.frames_per_s > 0 and relay.gaps_ms and relay.overlap > 0
    assert relays[1].overlap > 1  # the two streams really ran at once, one per worker
    assert "demo" in header["model"] and "gthread" in header["web"] and "2 Celery worker(s)" in header["web"]
    print_report(header, first, relays, turn_tokens=4, stream_tokens=32)
    out = capsys.readouterr().out
    assert "client TTFT" in out and "2 streams" in out and "high event rate" in out
    assert "SSE client TTFT" in out and "first-token relay, SSE / WS:" in out
