"""Compare vlgate with its peers on the demo checkpoint, side by side in one run: the same N concurrent image+prompt
requests against vlgate's stack, Hugging Face's `transformers serve` (in its own venv), and `model.generate` one
request at a time in process. Prints tokens/s, p50/p95 latency, p50 time to first token, and vlgate's ratios."""

from __future__ import annotations

import contextlib
import signal
import statistics
import tempfile
from pathlib import Path
from typing import Any

import click

from bench.peer_systems import InProcess, Round, TransformersServe, Vlgate, Workload
from bench.peer_venv import DEFAULT_DIR, PeerVenvError, ensure_peer_venv
from bench.service import pct, table
from common.config import Settings

SYSTEMS = ("vlgate", "peer", "inprocess")


def start_systems(names: list[str], peer_cb: bool, caches: bool, venv_dir: Path, settings: Settings, checkpoint: Path,
                  tmp: Path, cleanup: contextlib.ExitStack) -> tuple[list[Any], list[str]]:
    """Start each wanted system (stopped by ``cleanup``); return them and, for any that could not run, why."""
    systems: list[Any] = []
    missing: list[str] = []

    def add(system: Any) -> None:
        cleanup.callback(system.stop)
        system.start()
        systems.append(system)

    if "vlgate" in names:
        add(Vlgate(settings.data_dir, tmp / "vlgate", caches))
    if "peer" in names:
        try:
            venv = ensure_peer_venv(venv_dir)
            for cb in (False, True) if peer_cb else (False,):
                add(TransformersServe(venv, checkpoint, tmp, cb))
        except (PeerVenvError, OSError, RuntimeError, AssertionError) as exc:
            missing.append(f"transformers serve: NOT MEASURED: {exc}")
    if "inprocess" in names:
        add(InProcess(checkpoint, settings.min_image_pixels, settings.max_image_pixels))
    return systems, missing


def measure(systems: list[Any], workload: Workload, concurrency: list[int], rounds: int) -> list[Round]:
    """Warm every system once, then for each N run the rounds, the order of systems reversed every other round."""
    for system in systems:
        system.run(workload, 1)
    out = []
    for n in concurrency:
        for r in range(rounds):
            for system in systems if r % 2 == 0 else reversed(systems):
                done = system.run(workload, n)
                short = [x.completion_tokens for x in done.replies if x.completion_tokens != workload.tokens]
                print(f"  N={n:<3} round {r + 1}: {system.name:45} {done.tokens_per_s:8.1f} tok/s  wall "
                      f"{done.wall_s:6.2f} s" + (f"  (short answers: {short})" if short else ""), flush=True)
                out.append(done)
    return out


def summary(runs: list[Round]) -> dict[str, float]:
    """Return median tokens/s over rounds and latency/TTFT percentiles over every request of every round."""
    replies = [x for run in runs for x in run.replies]
    latency, ttft = [x.latency_s for x in replies], [x.ttft_s for x in replies]
    return {"tps": statistics.median(r.tokens_per_s for r in runs), "p50": pct(latency, 50), "p95": pct(latency, 95),
            "ttft": pct(ttft, 50), "spread": max(r.tokens_per_s for r in runs) / min(r.tokens_per_s for r in runs)}


def print_tables(systems: list[Any], runs: list[Round], concurrency: list[int], workload: Workload) -> None:
    """Print one table per N: every system's figures and vlgate's ratio to it."""
    names = [s.name for s in systems]
    for n in concurrency:
        stats = {name: summary([r for r in runs if r.system == name and r.n == n]) for name in names}
        base = stats.get("vlgate")
        rows = []
        for name in names:
            s = stats[name]
            ratios = ["", ""] if base is None or name == "vlgate" else [
                f"{base['tps'] / s['tps']:.2f}x", f"{s['p50'] / base['p50']:.2f}x"]
            rows.append([name, f"{s['tps']:.1f}", f"{s['p50']:.2f}", f"{s['p95']:.2f}", f"{s['ttft']:.3f}",
                         f"{s['spread']:.2f}", *ratios])
        print(f"\nN = {n} concurrent requests ({workload.tokens} tokens each, greedy)")
        table(["system", "tok/s", "p50 s", "p95 s", "TTFT p50 s", "max/min tok/s over rounds",
               "vlgate tok/s / theirs", "their p50 / vlgate p50"], rows)


def print_agreement(systems: list[Any], runs: list[Round]) -> None:
    """Compare each system's greedy answer per prompt with vlgate's (or the first system's)."""
    def answers(name: str) -> dict[str, tuple[str, int]]:
        return {x.prompt: (x.text, x.prompt_tokens) for r in runs if r.system == name for x in r.replies}

    ref = systems[0].name
    mine = answers(ref)
    print(f"\nSame answers? greedy text per prompt compared with {ref}'s (prompt tokens in brackets)")
    for system in systems[1:]:
        theirs = answers(system.name)
        same = sum(theirs.get(p, ("",))[0] == text for p, (text, _) in mine.items())
        prompts = sorted({mine[p][1] for p in mine}), sorted({theirs[p][1] for p in theirs})
        print(f"  {system.name}: {same}/{len(mine)} prompts identical (prompt tokens {ref} {prompts[0]}, "
              f"theirs {prompts[1]})")


@click.command()
@click.option("--systems", default=",".join(SYSTEMS), show_default=True,
              help="Which columns: vlgate, peer (transformers serve), inprocess.")
@click.option("--concurrency", default="1,8,64", show_default=True, help="Comma-separated N.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Rounds per N (system order alternates).")
@click.option("--tokens", type=int, default=64, show_default=True, help="max_tokens per request.")
@click.option("--peer-continuous-batching", is_flag=True,
              help="Also run `transformers serve --continuous-batching` as an extra column.")
@click.option("--vlgate-caches", is_flag=True, help="Keep vlgate's vision-encoder and session prefix caches on "
              "(default off: every request repeats the same image, which only vlgate could cache).")
@click.option("--peer-venv", type=click.Path(path_type=Path), default=DEFAULT_DIR, show_default=True,
              help="The peer's own venv (built once, reused while its marker matches).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Data dir with the demo checkpoint.")
def main(systems: str, concurrency: str, rounds: int, tokens: int, peer_continuous_batching: bool, vlgate_caches: bool,
         peer_venv: Path, data_dir: Path | None) -> None:
    """Print vlgate against transformers serve and model.generate, the same requests, alternating rounds."""
    from transformers.utils import logging as hf_logging

    from worker.demo import ensure_demo_checkpoint

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM tears everything down like Ctrl-C
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    names = [s.strip() for s in systems.split(",") if s.strip()]
    unknown = set(names) - set(SYSTEMS)
    if unknown:
        raise click.BadParameter(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}", param_hint="--systems")
    ns = [int(n) for n in concurrency.split(",")]
    settings = Settings(model="demo", device="cpu", hf_offline=True, **({"data_dir": data_dir} if data_dir else {}))
    checkpoint = ensure_demo_checkpoint(settings.demo_dir).resolve()
    workload = Workload(tokens)
    with tempfile.TemporaryDirectory(prefix="vlgate-peer-") as tmp, contextlib.ExitStack() as cleanup:
        (Path(tmp) / "vlgate").mkdir()
        started, missing = start_systems(names, peer_continuous_batching, vlgate_caches, peer_venv, settings,
                                         checkpoint, Path(tmp), cleanup)
        print(f"checkpoint: {checkpoint} (demo: tiny random-weight Qwen3-VL), CPU float32, 1 compute thread each")
        print(f"requests:   one 96x64 PNG + one of 4 prompts (the same for every system), max_tokens {tokens}, "
              f"temperature 0, streamed; N = {ns}, {rounds} rounds, system order reversed every other round")
        for system in started:
            print(f"- {system.name}: {system.describe()}")
        for line in missing:
            print(f"- {line}")
        try:
            runs = measure(started, workload, ns, rounds)
        except BaseException:
            print("\n".join(system.logs() for system in started))  # the servers' side of the failure
            raise
        for system in started:
            if isinstance(system, TransformersServe) and system.continuous_batching and system.fell_back():
                print(f"note: {system.name} logged that this vision model does not support continuous batching: "
                      "it generated sequentially")
    print_tables(started, runs, ns, workload)
    if len(started) > 1:
        print_agreement(started, runs)
    for line in missing:
        print(f"\n{line}")


if __name__ == "__main__":
    main()
