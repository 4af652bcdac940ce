"""Measure the engine: batched versus one-at-a-time on the demo and mid shapes, and decode speed at Qwen3-VL-4B's."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from PIL import Image

from common.config import Settings
from worker.engine import Engine, GenerationRequest, GenerationResult, ModelInfo, Turn
from worker.sampling import SamplingParams

# Cycled over the requests so prompt lengths differ and a batch really is left padded.
IMAGE_SIZES = [(64, 48), (384, 256), (256, 256), (256, 448)]

# Peak memory bandwidth (GB/s) by GPU name; the first fragment found in the lowercased name wins, so order matters.
KNOWN_BANDWIDTH_GBS = [
    ("h100 pcie", 2000), ("h100", 3350), ("h200", 4800), ("a100-sxm4-80gb", 2039), ("a100 80gb", 2039),
    ("a100", 1555), ("l40s", 864), ("rtx 4090", 1008),
]

# The demo tokenizer's names for the ids the 4B config must point at, so the demo processor drives the big model.
VISION_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


@dataclass
class BatchingRow:
    """Throughput of B requests generated together and one at a time."""

    batch: int
    batched_tps: float
    sequential_tps: float

    @property
    def ratio(self) -> float:
        """Return how many times faster the batched run is."""
        return self.batched_tps / self.sequential_tps


@dataclass
class DecodeRow:
    """Prefill time and per-step decode time of one batch size."""

    batch: int
    prefill_s: float
    step_s: float

    @property
    def tokens_per_s(self) -> float:
        """Return decoded tokens per second over the whole batch."""
        return self.batch / self.step_s


def make_requests(count: int, tokens: int, tag: str = "r") -> list[GenerationRequest]:
    """Build greedy one-image requests that each generate exactly ``tokens`` tokens."""
    return [
        GenerationRequest(
            f"{tag}{i}",
            [Turn("user", "Describe this picture.", [Image.new("RGB", IMAGE_SIZES[i % 4], (40 * i % 256, 120, 200))])],
            SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens),
        )
        for i in range(count)
    ]


def _checked(results: list[GenerationResult], tokens: int) -> list[GenerationResult]:
    """Fail loudly if a row errored or stopped early, since its numbers would be wrong."""
    for result in results:
        if result.completion_tokens != tokens:
            raise RuntimeError(f"{result.request_id} made {result.completion_tokens}/{tokens} tokens "
                               f"({result.finish_reason}: {result.error_message})")
    return results


def _tokens_per_s(engine: Engine, batches: Sequence[Sequence[GenerationRequest]], tokens: int) -> float:
    """Run the batches one after another; return generated tokens per second of wall time."""
    start = time.perf_counter()
    made = sum(r.completion_tokens for batch in batches for r in _checked(engine.generate(batch), tokens))
    return made / (time.perf_counter() - start)


def compare_batching(engine: Engine, batch_sizes: Sequence[int], tokens: int, repeats: int) -> list[BatchingRow]:
    """Measure tok/s of B requests in one ``generate`` call versus B sequential calls; keep the medians."""
    engine.generate(make_requests(max(batch_sizes), tokens, "warm"))  # first calls pay one-off allocator costs
    rows = []
    for batch in batch_sizes:
        requests = make_requests(batch, tokens)
        together, alone = [], []
        for _ in range(repeats):  # interleaved, so drift (thermal, other load) hits both sides alike
            together.append(_tokens_per_s(engine, [requests], tokens))
            alone.append(_tokens_per_s(engine, [[r] for r in requests], tokens))
        rows.append(BatchingRow(batch, statistics.median(together), statistics.median(alone)))
    return rows


def measure_decode(engine: Engine, batch_sizes: Sequence[int], tokens: int, repeats: int) -> list[DecodeRow]:
    """Split each batch's wall time into prefill (to the first token) and per-step decode time; keep medians."""
    if tokens < 2:
        raise click.BadParameter("decode timing needs at least 2 tokens", param_hint="--tokens")
    engine.generate(make_requests(1, 2, "warm"))
    rows = []
    for batch in batch_sizes:
        prefill, step = [], []
        for _ in range(repeats):
            timings = [r.timings for r in _checked(engine.generate(make_requests(batch, tokens)), tokens)]
            first = max(t["first_token_at"] for t in timings)  # rows share steps: the batch's first token
            prefill.append(first - min(t["started_at"] for t in timings))
            step.append((max(t["finished_at"] for t in timings) - first) / (tokens - 1))
        rows.append(DecodeRow(batch, statistics.median(prefill), statistics.median(step)))
    return rows


def qwen3_vl_4b_config(token_ids: dict[str, int] | None = None) -> Any:
    """Return a config with Qwen3-VL-4B-Instruct's exact shapes; ``token_ids`` overrides the vision token ids."""
    from transformers import Qwen3VLConfig

    text = {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000, "mrope_section": [24, 20, 20],
                                "mrope_interleaved": True}}
    vision = {"depth": 24, "hidden_size": 1024, "num_heads": 16, "intermediate_size": 4096, "patch_size": 16,
              "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 2560,
              "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17]}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **(token_ids or {}))
    config._attn_implementation = "sdpa"
    return config


def meta_model(config: Any) -> Any:
    """Build the model on the meta device: shapes only, no memory."""
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        return Qwen3VLForConditionalGeneration(config)


def count_parameters(model: Any) -> int:
    """Count parameters, the tied embedding once."""
    return sum(p.numel() for p in model.parameters())


def build_random_model(config: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Materialize the model straight on ``device`` in ``dtype`` with cheap random weights (no host copy)."""
    model = meta_model(config).to(dtype=dtype).to_empty(device=device)
    model.tie_weights()  # moving off the meta device gives each module its own tensor: share the embedding again
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)  # norm gains: ones keep activations at a sane scale through 36 layers
            else:
                param.normal_(0.0, 0.02)
        for module in model.modules():
            if hasattr(module, "inv_freq"):
                fresh = type(module)(module.config)  # rope tables are computed, not learned: rebuild them for real
                for name, buffer in fresh.named_buffers(recurse=False):
                    setattr(module, name, buffer.to(device))
    return model.eval()


def decode_weight_bytes(model: Any) -> int:
    """Return the bytes each decode step must read: the language model and its head (vision runs in prefill only)."""
    params = {id(p): p for p in [*model.model.language_model.parameters(), *model.lm_head.parameters()]}
    return sum(p.numel() * p.element_size() for p in params.values())


def measure_bandwidth_gbs(device: torch.device, gib: float = 1.0) -> float:
    """Time a large on-device copy; return bytes read plus written per second, in GB/s."""
    src = torch.ones(int(gib * 2**30) // 4, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(6):  # the first copy warms up; the fastest is closest to the hardware limit
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def bandwidth_gbs(device: torch.device, given: float | None) -> tuple[float, str]:
    """Return the memory bandwidth to compare against, and where it came from."""
    if given:
        return given, "given with --bandwidth-gbs"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, gbs in KNOWN_BANDWIDTH_GBS:
            if fragment in name.lower():
                return float(gbs), f"spec sheet for {name}"
    return measure_bandwidth_gbs(device), "measured: 1 GiB on-device copy, bytes read + written"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """Print right-aligned columns under a header line."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for line in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))


def run_demo(settings: Settings, batch_sizes: list[int], tokens: int, repeats: int, shape: str = "demo") -> None:
    """Load a random-weight shape (demo or mid) and print batched versus sequential throughput and step times."""
    from worker.loader import load_engine
    from worker.shapes import ensure_shaped_checkpoint

    if shape != "demo":
        path = ensure_shaped_checkpoint(settings.demo_dir, shape)
        settings = settings.model_copy(update={"model": str(path)})
        torch.set_num_threads(1)  # the step the service benches see: their worker runs with OMP_NUM_THREADS=1
    engine = load_engine(settings)
    info = engine.info
    print(f"model: {info.label}\ndevice: {info.device}  dtype: {info.dtype}  torch threads: {torch.get_num_threads()}")
    print(f"{tokens} tokens per request (greedy, min_tokens = max_tokens), one image each, median of {repeats}; "
          "tok/s = generated tokens / wall time, prefill included\n")
    rows = compare_batching(engine, batch_sizes, tokens, repeats)
    print_table(["batch", "batched tok/s", "sequential tok/s", "batched/sequential"],
                [[str(r.batch), f"{r.batched_tps:.1f}", f"{r.sequential_tps:.1f}", f"{r.ratio:.2f}x"] for r in rows])
    print(f"\nDecode step (first token -> last, over {tokens - 1} steps), median of {repeats}")
    steps = measure_decode(engine, batch_sizes, tokens, repeats)
    print_table(["batch", "prefill s", "step ms", "decode tok/s"],
                [[str(r.batch), f"{r.prefill_s:.3f}", f"{r.step_s * 1e3:.1f}", f"{r.tokens_per_s:.1f}"] for r in steps])


def run_4b(settings: Settings, batch_sizes: list[int], tokens: int, repeats: int, given_gbs: float | None) -> None:
    """Build a random Qwen3-VL-4B-shaped model in memory and print decode speed against the bandwidth limit."""
    from worker.demo import ensure_demo_checkpoint
    from worker.loader import resolve_device, resolve_dtype
    from worker.processor import load_processor

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if device.type == "cpu":
        print("warning: 4B shapes on the CPU: expect about 1 tok/s and ~18 GB of memory")
    processor = load_processor(str(ensure_demo_checkpoint(settings.demo_dir)), min_pixels=settings.min_image_pixels,
                               max_pixels=settings.max_image_pixels, local_only=True)
    config = qwen3_vl_4b_config({k: processor.tokenizer.convert_tokens_to_ids(v) for k, v in VISION_TOKENS.items()})
    gbs, source = bandwidth_gbs(device, given_gbs)  # before the model, so a measured copy has memory to spare
    start = time.perf_counter()
    model = build_random_model(config, device, dtype)
    params = count_parameters(model)
    info = ModelInfo("qwen3-vl-4b-shapes", "(in memory)", "random-weight Qwen3-VL-4B shapes", True, str(device),
                     str(dtype).removeprefix("torch."), params, config.text_config.max_position_embeddings)
    engine = Engine(model, processor, info)
    weight_bytes = decode_weight_bytes(model)
    print(f"model: {info.label}, {params:,} parameters, built in {time.perf_counter() - start:.1f} s")
    print(f"device: {device}  dtype: {info.dtype}  torch threads: {torch.get_num_threads()}")
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(device)}")
    print(f"bandwidth: {gbs:.0f} GB/s ({source})")
    ideal_s = weight_bytes / (gbs * 1e9)
    print(f"weights read per decode step: {weight_bytes / 1e9:.2f} GB -> ideal step {ideal_s * 1e3:.2f} ms "
          f"(KV cache reads ignored: small at these lengths)")
    print(f"{tokens} tokens per request (greedy, min_tokens = max_tokens), one image each, median of {repeats}\n")
    rows = measure_decode(engine, batch_sizes, tokens, repeats)
    print_table(["batch", "prefill s", "step ms", "decode tok/s", "of bandwidth limit"],
                [[str(r.batch), f"{r.prefill_s:.2f}", f"{r.step_s * 1e3:.1f}", f"{r.tokens_per_s:.1f}",
                  f"{ideal_s / r.step_s:.0%}"] for r in rows])
    if device.type == "cuda":
        print(f"\nmax memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


@click.command()
@click.option("--shape", type=click.Choice(["demo", "mid", "4b"]), default="demo", show_default=True,
              help="demo: batched vs sequential on the tiny model; mid: the same on the benchmark shape whose CPU step "
              "matches the 4B model's GPU step (worker/shapes.py); 4b: decode speed at Qwen3-VL-4B shapes.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Data dir with the demo checkpoint.")
@click.option("--device", default="auto", show_default=True, help="'auto', 'cpu' or 'cuda:N'.")
@click.option("--tokens", type=int, default=None,
              help="New tokens per request [demo 64; mid 32; 4b 32 on GPU, 8 on CPU].")
@click.option("--batch-sizes", default=None, help="Comma-separated [demo 1,4,8; mid 1,8; 4b 1,16 on GPU, 1,2 on CPU].")
@click.option("--repeats", type=int, default=None, help="Runs per measurement, median [3; mid 2; 4b on CPU 1].")
@click.option("--bandwidth-gbs", "given_gbs", type=float, default=None,
              help="Memory bandwidth [by GPU name, else measured].")
def main(shape: str, data_dir: Path | None, device: str, tokens: int | None, batch_sizes: str | None,
         repeats: int | None, given_gbs: float | None) -> None:
    """Print engine throughput measured side by side in one run."""
    given = {"data_dir": data_dir} if data_dir else {}
    settings = Settings(model="demo", device=device, hf_offline=True, **given)
    if shape == "demo":
        sizes = [int(b) for b in (batch_sizes or "1,4,8").split(",")]
        run_demo(settings, sizes, tokens or 64, repeats or 3)
        return
    if shape == "mid":
        sizes = [int(b) for b in (batch_sizes or "1,8").split(",")]
        run_demo(settings, sizes, tokens or 32, repeats or 2, "mid")
        return
    on_cpu = not torch.cuda.is_available() or device == "cpu"
    sizes = [int(b) for b in (batch_sizes or ("1,2" if on_cpu else "1,16")).split(",")]
    run_4b(settings, sizes, tokens or (8 if on_cpu else 32), repeats or (1 if on_cpu else 3), given_gbs)


if __name__ == "__main__":
    main()
