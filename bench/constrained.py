"""Measure what constrained decoding costs a decode step: free rows and grammar-masked rows in one decode batch,
in process on the demo engine."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import click
import jsonschema
import torch
from PIL import Image

import worker.engine as engine_module
from bench.engine import print_table
from common.config import Settings
from worker.constraints import RowConstraint
from worker.engine import Engine
from worker.generation import GenerationRequest, GenerationResult, Turn
from worker.sampling import SamplingParams

PROMPT = "Describe this picture."
QWEN3_VL_VOCAB = 151_936  # the real checkpoints' logits width, for the note under the table


def digits_format(items: int) -> dict[str, Any]:
    """Return a json_schema response_format for an array of exactly ``items`` one-digit integers."""
    # Compact JSON: "[d,d,...,d]" is 2 * items + 1 bytes, and digits never merge with "," into one token,
    # so a row makes about that many tokens whatever it samples (checked on every run, never assumed).
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
              "minItems": items, "maxItems": items}
    return {"type": "json_schema", "json_schema": {"name": "digits", "schema": schema, "strict": True}}


@dataclass
class Round:
    """One ``generate`` call: its requests and results, and per measured step its wall, mask and accept time (ms)."""

    requests: list[GenerationRequest]
    results: list[GenerationResult]
    step_ms: list[float]
    mask_ms: list[float]  # in mask_rows: every masked row's allowed tokens, applied to the logits
    accept_ms: list[float]  # in RowConstraint.accept: every masked row's grammar advanced by its token

    @property
    def grammar_ms(self) -> list[float]:
        """Return per measured step the time the grammars took, masks and advances together."""
        return [m + a for m, a in zip(self.mask_ms, self.accept_ms, strict=True)]


@dataclass
class Mix:
    """All rounds of one decode batch composition: ``constrained`` of ``batch`` rows masked."""

    constrained: int
    batch: int
    rounds: list[Round]

    @property
    def per_round_ms(self) -> list[float]:
        """Return each round's decode time / steps over the measured window."""
        return [statistics.mean(r.step_ms) for r in self.rounds]

    def median_ms(self, part: str) -> float:
        """Return the median over rounds of a round's mean ``step_ms``, ``mask_ms``, ``accept_ms`` or ``grammar_ms``."""
        return statistics.median(statistics.mean(getattr(r, part)) for r in self.rounds)


class StepClock:
    """Stamp every decode step through the engine's own hook, and the grammar work done inside each."""

    def __init__(self) -> None:
        self.spent = {"mask": 0.0, "accept": 0.0}  # seconds so far inside each grammar call
        self.stamps: list[tuple[float, int, float, float]] = []  # (perf_counter, running rows, mask s, accept s)

    def admit(self, running: int) -> list[GenerationRequest]:
        """Stamp a step boundary (asked once per step, between choosing tokens and the forward); admit nothing."""
        self.stamps.append((time.perf_counter(), running, self.spent["mask"], self.spent["accept"]))
        return []

    def steps(self) -> list[tuple[int, float, float, float]]:
        """Return per step: rows in its forward, its seconds (forward + choosing every row's token), mask, accept."""
        return [(rows, t1 - t0, m1 - m0, a1 - a0)
                for (t0, rows, m0, a0), (t1, _, m1, a1) in itertools.pairwise(self.stamps)]

    @contextlib.contextmanager
    def probing(self) -> Iterator[None]:
        """Time ``mask_rows`` and ``RowConstraint.accept`` as the engine calls them, without touching worker code."""
        mask, accept = engine_module.mask_rows, RowConstraint.accept

        def timed_mask(constraints: Any, logits: torch.Tensor) -> None:
            start = time.perf_counter()
            try:
                mask(constraints, logits)
            finally:
                self.spent["mask"] += time.perf_counter() - start

        def timed_accept(row: RowConstraint, token_id: int) -> None:
            start = time.perf_counter()
            try:
                accept(row, token_id)
            finally:
                self.spent["accept"] += time.perf_counter() - start

        with mock.patch.object(engine_module, "mask_rows", timed_mask), \
                mock.patch.object(RowConstraint, "accept", timed_accept):
            yield


def make_requests(batch: int, constrained: int, tokens: int, seed: int) -> list[GenerationRequest]:
    """Build ``batch`` sampled one-image rows: the first ``constrained`` under the digits schema, the rest free."""
    items = tokens // 2  # 2 * items + 1 >= tokens: a constrained row outlives the free ones
    rows = []
    for i in range(batch):
        if i < constrained:  # the grammar, not min_tokens, ends it; the spare budget lets it finish the JSON
            params = SamplingParams(temperature=1.0, seed=seed + i, max_tokens=4 * items + 8,
                                    response_format=digits_format(items))
        else:
            params = SamplingParams(temperature=1.0, seed=seed + i, max_tokens=tokens, min_tokens=tokens)
        image = Image.new("RGB", (96, 64), (20, 120, 220))
        rows.append(GenerationRequest(f"{'cf'[i >= constrained]}{seed + i}", [Turn("user", PROMPT, [image])], params))
    return rows


def run_round(engine: Engine, batch: int, constrained: int, tokens: int, seed: int) -> Round:
    """Decode one batch; keep the first ``tokens - 2`` decode steps, which run every row in every mix."""
    requests = make_requests(batch, constrained, tokens, seed)
    clock = StepClock()
    with clock.probing():
        results = engine.generate(requests, admit=clock.admit)
    for req, res in zip(requests, results, strict=True):
        short = res.completion_tokens < tokens if req.params.response_format else res.completion_tokens != tokens
        if short or res.finish_reason == "error":  # a row leaving early would shrink the batch being measured
            raise RuntimeError(f"{res.request_id}: {res.completion_tokens} tokens, {tokens} needed "
                               f"({res.finish_reason}: {res.error_message})")
    # Step k (0-based) makes token k + 2, the prefill made token 1; free rows end on token ``tokens``: stop before.
    window = clock.steps()[: tokens - 2]
    if len(window) < tokens - 2 or any(step[0] != batch for step in window):
        raise RuntimeError(f"decode steps {[step[0] for step in window]}: not {tokens - 2} of {batch} rows")
    step_ms, mask_ms, accept_ms = ([s[i] * 1e3 for s in window] for i in (1, 2, 3))
    return Round(requests, results, step_ms, mask_ms, accept_ms)


def measure(engine: Engine, batch: int, tokens: int, rounds: int, warmup: int = 1) -> list[Mix]:
    """Run all free, half constrained and all constrained in turn, rotating the order each round so drift hits all."""
    if tokens < 3:
        raise click.BadParameter("at least 3 tokens: the first decode step and the last are not measured")
    if batch < 2:
        raise click.BadParameter("at least 2 rows: half of them are masked in one mix")
    mixes = [Mix(c, batch, []) for c in (0, batch // 2, batch)]
    threads = torch.get_num_threads()
    # One torch thread, as the stacks' workers run (OMP_NUM_THREADS=1): a step never waits at an OpenMP barrier
    # for a core another process holds, and llguidance's mask threads get the others.
    torch.set_num_threads(1)
    try:
        for r in range(warmup + rounds):  # warmup compiles the grammar and warms the allocator
            for k in range(len(mixes)):
                mix = mixes[(r + k) % len(mixes)]
                done = run_round(engine, batch, mix.constrained, tokens, seed=1000 * r)
                if r >= warmup:
                    mix.rounds.append(done)
    finally:
        torch.set_num_threads(threads)
    return mixes


def valid(result: GenerationResult, request: GenerationRequest) -> bool:
    """Tell whether a constrained row's text is JSON that its request's schema accepts."""
    try:
        jsonschema.validate(json.loads(result.text), request.params.response_format["json_schema"]["schema"])
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def print_report(engine: Engine, mixes: list[Mix], tokens: int) -> None:
    """Print the setup, ms per decode step by mix with ratios to all free, and what the rows produced."""
    free = mixes[0]
    batch, rounds = free.batch, len(free.rounds)
    vocab = int(engine.model.get_output_embeddings().weight.shape[0])
    print(f"model:    {engine.info.label}; logits width {vocab:,} tokens")
    print(f"device:   {engine.info.device} {engine.info.dtype}; torch threads 1; llguidance "
          f"computes several rows' masks on its own thread pool; {os.cpu_count()} CPU cores")
    print(f"rows:     {batch} per decode batch, each '{PROMPT}' + one 96x64 PNG, temperature 1, own seed")
    print(f"free:     min_tokens = max_tokens = {tokens}")
    print(f"masked:   response_format json_schema, an array of exactly {tokens // 2} integers 0..9 (compact JSON, "
          f"{tokens // 2 * 2 + 1} bytes)")
    print(f"step:     wall time between the engine's consecutive admit() calls (one forward + every row's token), "
          f"decode steps 1..{tokens - 2} (all {batch} rows run in every mix); per round decode time / steps, "
          f"then the median of {rounds} rounds, mixes alternated")
    print("mask, accept: time per step inside mask_rows and RowConstraint.accept, timed as the engine calls them; "
          "grammar share: (mask + accept) / ms/step\n")

    def row(mix: Mix) -> list[str]:
        ms = mix.per_round_ms
        q1, median, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0],) * 3
        paired = [m / f for m, f in zip(ms, free.per_round_ms, strict=True)]  # same round: same drift
        extra = statistics.median(m - f for m, f in zip(ms, free.per_round_ms, strict=True))
        name = {0: "all free", batch: "all constrained"}.get(mix.constrained, "half constrained")
        return [name, f"{mix.constrained}/{batch}", f"{statistics.median(ms):.3f}", f"{q1:.3f}-{q3:.3f}",
                f"{statistics.median(paired):.3f}x", f"{extra:+.3f}", f"{mix.median_ms('mask_ms'):.3f}",
                f"{mix.median_ms('accept_ms'):.3f}", f"{mix.median_ms('grammar_ms') / statistics.median(ms):.1%}"]

    print_table(["decode batch", "masked rows", "ms/step", "p25-p75", "vs all free", "extra ms/step", "mask ms",
                 "accept ms", "grammar share"], [row(m) for m in mixes])
    masked = [(req, res) for m in mixes for r in m.rounds for req, res in zip(r.requests, r.results, strict=True)
              if req.params.response_format]
    lengths = [res.completion_tokens for _, res in masked]
    stopped = sum(res.finish_reason == "stop" for _, res in masked)
    good = sum(valid(res, req) for req, res in masked)
    print(f"\ntokens per row: free {tokens} (finish 'length'); masked {min(lengths)}-{max(lengths)}, "
          f"finish 'stop' {stopped}/{len(masked)}; masked answers valid per their schema (jsonschema) "
          f"{good}/{len(masked)}")
    print("vs all free: median over rounds of this mix's ms/step / all free's in the same round; extra ms/step: "
          "median of the same differences")
    if vocab < QWEN3_VL_VOCAB:
        print(f"note: the demo vocabulary is {vocab:,} tokens, Qwen3-VL's {QWEN3_VL_VOCAB:,}. A mask's cost grows with "
              "the vocabulary and a forward's with the model, so these shares do not carry over to a real checkpoint")


@click.command()
@click.option("--batch", type=int, default=8, show_default=True, help="Rows per decode batch.")
@click.option("--tokens", type=int, default=65, show_default=True,
              help="Tokens per free row; masked rows make at least as many.")
@click.option("--rounds", type=int, default=40, show_default=True, help="Measured rounds of every mix.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Unmeasured rounds first.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Data dir with the demo checkpoint.")
def main(batch: int, tokens: int, rounds: int, warmup: int, data_dir: Path | None) -> None:
    """Print the decode-step cost of grammar-masked rows next to free ones in one decode batch."""
    from transformers.utils import logging as hf_logging

    from worker.loader import load_engine

    hf_logging.disable_progress_bar()
    settings = Settings(model="demo", device="cpu", hf_offline=True, **({"data_dir": data_dir} if data_dir else {}))
    engine = load_engine(settings)
    print_report(engine, measure(engine, batch, tokens, rounds, warmup), tokens)


if __name__ == "__main__":
    main()
