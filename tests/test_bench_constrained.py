"""The constrained-decoding benchmark's core on the demo engine with tiny numbers."""

from __future__ import annotations

import json

import jsonschema
import pytest

import worker.constraints
import worker.engine
from bench.constrained import Mix, measure, print_report
from worker.constraints import RowConstraint
from worker.engine import Engine

pytestmark = pytest.mark.slow

BATCH, TOKENS, ROUNDS = 4, 9, 2
ACCEPT = RowConstraint.accept  # as imported, before the bench's probe wraps it


@pytest.fixture(scope="module")
def mixes(engine: Engine) -> list[Mix]:
    """Every mix measured twice after one warmup round."""
    return measure(engine, BATCH, TOKENS, ROUNDS, warmup=1)


def test_probe_is_gone_after_measuring(mixes: list[Mix]) -> None:
    assert worker.engine.mask_rows is worker.constraints.mask_rows and RowConstraint.accept is ACCEPT


def test_mixes_hold_the_masked_rows_they_are_named_for(mixes: list[Mix]) -> None:
    assert [(m.constrained, m.batch, len(m.rounds)) for m in mixes] == [(0, 4, 2), (2, 4, 2), (4, 4, 2)]
    for mix in mixes:
        for done in mix.rounds:
            assert len(done.requests) == len(done.results) == BATCH
            assert [r.request_id for r in done.requests] == [r.request_id for r in done.results]
            assert sum(r.params.response_format is not None for r in done.requests) == mix.constrained


def test_every_masked_answer_validates_and_outlives_the_window(mixes: list[Mix]) -> None:
    masked = 0
    for mix in mixes:
        for done in mix.rounds:
            for request, result in zip(done.requests, done.results, strict=True):
                if request.params.response_format is None:
                    assert (result.completion_tokens, result.finish_reason) == (TOKENS, "length")
                    continue
                masked += 1
                schema = request.params.response_format["json_schema"]["schema"]
                jsonschema.validate(json.loads(result.text), schema)
                assert result.finish_reason == "stop"  # ended by the grammar, not by its token budget
                assert result.completion_tokens >= TOKENS  # so every measured step ran the whole decode batch
    assert masked == ROUNDS * (BATCH // 2 + BATCH)


def test_steps_are_timed_and_grammar_time_lands_only_in_masked_mixes(mixes: list[Mix]) -> None:
    for mix in mixes:
        for done in mix.rounds:
            assert len(done.step_ms) == len(done.mask_ms) == len(done.accept_ms) == TOKENS - 2
            assert all(ms > 0 for ms in done.step_ms)
            assert all(g < s for g, s in zip(done.grammar_ms, done.step_ms, strict=True))  # a part of its step
            if mix.constrained:  # every step masks and advances the grammars: the probe sees the engine's calls
                assert all(ms > 0 for ms in done.mask_ms) and all(ms > 0 for ms in done.accept_ms)
            else:
                assert done.mask_ms == done.accept_ms == [0.0] * (TOKENS - 2)


def test_report_names_every_mix_and_counts_valid_answers(engine: Engine, mixes: list[Mix],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    print_report(engine, mixes, TOKENS)
    out = capsys.readouterr().out
    for line in ("all free", "half constrained", "all constrained", "mask ms", "accept ms", "grammar share"):
        assert line in out
    masked = ROUNDS * (BATCH // 2 + BATCH)
    assert f"finish 'stop' {masked}/{masked}" in out and f"(jsonschema) {masked}/{masked}" in out
    assert f"free {TOKENS} (finish 'length')" in out
