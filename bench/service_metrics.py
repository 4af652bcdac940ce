"""What worker metrics cost: the same workload on a stack with them on and one with them off, rounds alternating."""

from __future__ import annotations

import contextlib
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bench.service_stack import IMAGE_B64, PROMPT, Stack, table


@dataclass
class MetricsCost:
    """One measure of the same workload, round by round, on a stack with worker metrics on and one with them off."""

    what: str
    unit: str
    higher_is_better: bool
    on: list[list[float]] = field(default_factory=list)
    off: list[list[float]] = field(default_factory=list)
    port: int | None = None  # the last metrics-on worker's /metrics port
    tokens_counted: float = 0  # the metrics-on workers' vllm:generation_tokens_total: proof that they recorded

    @property
    def ratio(self) -> float:
        """Return on/off of the medians over every round."""
        return statistics.median(sum(self.on, [])) / statistics.median(sum(self.off, []))

    @property
    def round_ratios(self) -> list[float]:
        """Return on/off of the medians, round by round."""
        return [statistics.median(a) / statistics.median(b) for a, b in zip(self.on, self.off, strict=True)]

    def interval(self, resamples: int = 2000) -> tuple[float, float]:
        """Return a 95 % bootstrap interval of ``ratio`` (each side's samples resampled): the noise it carries."""
        rng, on, off = random.Random(0), sum(self.on, []), sum(self.off, [])
        ratios = sorted(statistics.median(rng.choices(on, k=len(on))) / statistics.median(rng.choices(off, k=len(off)))
                        for _ in range(resamples))
        return ratios[int(resamples * 0.025)], ratios[int(resamples * 0.975) - 1]

    @property
    def cost_pct(self) -> float:
        """Return what metrics on costs in percent: slower (latency up or throughput down) is positive."""
        return ((1 / self.ratio if self.higher_is_better else self.ratio) - 1) * 100


@contextlib.contextmanager
def two_stacks(make: Callable[[Path, bool], Stack]) -> Iterator[tuple[Stack, Stack]]:
    """Start two private stacks, ``make(tmp, metrics)``, the first with worker metrics on; always stop both."""
    with contextlib.ExitStack() as cleanup:
        stacks = []
        for metrics in (True, False):
            tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="vlgate-bench-")))
            stacks.append(make(tmp, metrics))
            cleanup.callback(stacks[-1].stop)
        for stack in stacks:
            stack.start()
        yield stacks[0], stacks[1]


def compare_metrics(stacks: tuple[Stack, Stack], measure: Callable[[Stack], list[float]],
                    warmup: Callable[[Stack], object], rounds: int, cost: MetricsCost) -> MetricsCost:
    """Measure the metrics-on and the metrics-off stack in every round, and cross over halfway.

    The order flips every round (on-off, off-on), so drift on the host hits both alike. Halfway both workers are
    replaced by fresh ones with metrics the other way round, so whatever differs between the two stacks' processes
    (not only the metrics: an A/A run of two identical stacks here differed by a few per cent) weighs on both sides.
    """
    on, off = stacks
    for stack in stacks:
        warmup(stack)
    for i in range(rounds):
        if i == rounds // 2:
            cost.tokens_counted += on.generation_tokens_counted()  # the replaced worker takes its counters along
            on.replace_worker(False)
            off.replace_worker(True)
            on, off = off, on
            for stack in stacks:
                stack.wait_for_worker()
                warmup(stack)
        for metrics in (True, False) if i % 2 == 0 else (False, True):
            (cost.on if metrics else cost.off).append(measure(on if metrics else off))
    cost.port, cost.tokens_counted = on.metrics_port, cost.tokens_counted + on.generation_tokens_counted()
    return cost


def print_metrics_cost(cost: MetricsCost) -> None:
    """Print the on/off ratio, its spread over the rounds, and proof that the on side recorded."""
    ratios, (low, high) = cost.round_ratios, cost.interval()
    print(f"\nWorker metrics on/off: {cost.what}; {cost.unit}")
    print(f"ratio on/off = {cost.ratio:.3f} (cost {cost.cost_pct:+.1f} %, target < 2 %), 95 % bootstrap interval "
          f"{low:.3f}-{high:.3f}; medians of {len(sum(cost.on, []))} per side over {len(ratios)} rounds, on-off and "
          f"off-on in turn, the stacks swapping roles halfway; per-round ratios: median "
          f"{statistics.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}")
    costs = sorted(((1 / r if cost.higher_is_better else r) - 1) * 100 for r in (low, high))
    if costs[1] < 2:
        print(f"verdict: under 2 % (the interval's worst cost is {costs[1]:+.1f} %)")
    elif costs[0] > 2:
        print(f"verdict: over 2 % (the interval's best cost is {costs[0]:+.1f} %)")
    else:
        print(f"verdict: not resolved: the interval, costs {costs[0]:+.1f} % to {costs[1]:+.1f} %, spans the 2 % "
              "target; the host is too noisy for this many samples (run on a quiet host, or more --rounds)")
    table(["side", "median", "mean", "min", "max"],
          [[name, *(f"{f(sum(values, [])):.2f}" for f in (statistics.median, statistics.mean, min, max))]
           for name, values in (("metrics on", cost.on), ("metrics off", cost.off))])
    print(f"on: VLGATE_METRICS_PORT=<free port> (last {cost.port}), the on workers' vllm:generation_tokens_total "
          f"summed = {cost.tokens_counted:.0f}; off: VLGATE_METRICS_PORT=0 (no-op metrics, nothing served). The web's "
          "/metrics counters are on in both (they are not switchable).")


def chat_latencies(stack: Stack, count: int, tokens: int) -> list[float]:
    """Return the milliseconds of ``count`` chats over HTTP, one after another, each checked."""
    body = {"prompt": PROMPT, "image": IMAGE_B64, "temperature": 0, "max_tokens": tokens, "min_tokens": tokens,
            "wait": 120}
    out = []
    with requests.Session() as http:
        for i in range(count):
            start = time.perf_counter()
            answer = http.post(f"{stack.base}/api/chat", json=body, timeout=180)
            out.append((time.perf_counter() - start) * 1e3)
            if answer.status_code != 200 or answer.json()["usage"]["completion_tokens"] != tokens:
                raise RuntimeError(f"chat {i}: HTTP {answer.status_code}: {answer.text[:300]}")
    return out


def run_metrics_compare(data_dir: Path, rounds: int, count: int, warmup: int, tokens: int,
                        database: str = "sqlite") -> MetricsCost:
    """Measure chat e2e latency on a stack with worker metrics on and one with them off, alternating rounds."""
    cost = MetricsCost(f"one chat job e2e (POST /api/chat, {tokens} tokens greedy, one 96x64 PNG), {count} per "
                       "side per round", "ms", higher_is_better=False)
    with two_stacks(lambda tmp, metrics: Stack(data_dir, tmp, database, metrics)) as stacks:
        return compare_metrics(stacks, lambda stack: chat_latencies(stack, count, tokens),
                               lambda stack: chat_latencies(stack, warmup, tokens), rounds, cost)
