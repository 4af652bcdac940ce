"""Named benchmark shapes: random-weight Qwen3-VL checkpoints between the tiny demo and the real 4B model.

``demo`` is the tiny checkpoint tests use (a decode step of ~2 ms on one CPU thread, so any fixed per-step or
per-job cost of the service looks huge next to it). ``mid`` keeps Qwen3-VL-4B's structure where it sets the
decode step's cost on a GPU, 36 decoder layers of small kernels, and shrinks the widths until one decode step
at batch 1 on one thread of this 2-core CPU takes about what the 4B model's step takes on a datacenter GPU
with transformers eager/sdpa: ~20-30 ms. On a GPU that step is launch-bound, not bandwidth-bound (8 GB of bf16
weights read at 3.35 TB/s is ~2.5 ms on an H100), so it costs ~36 layers x ~20 kernels x ~20-40 us of Python
and launch overhead; HF ``generate`` on Qwen-family 3-4B models reports ~30-45 tokens/s at batch 1. With the
mid shape, the service's fixed costs (HTTP, database, Celery, Redis) weigh against the decode time as they
would in production. Same tokenizer, processor and chat template as the demo; labelled as random weights.
Measured with ``bench.engine --shape mid`` (one thread, like the worker): 21-36 ms per step at batch 1 depending
on the host's other load (a bare forward 21 ms at best); the demo's is ~1-2 ms.
"""

from __future__ import annotations

from pathlib import Path

from worker.demo import DEMO_VERSION, ensure_checkpoint, ensure_demo_checkpoint

# Bump when the mid recipe changes so cached checkpoints are rebuilt.
MID_VERSION = 2
MID_TEXT = {"hidden_size": 256, "intermediate_size": 1280, "num_hidden_layers": 36, "num_attention_heads": 8,
            "num_key_value_heads": 4, "head_dim": 32, "mrope_section": [6, 5, 5]}
MID_VISION = {"depth": 2, "hidden_size": 64, "intermediate_size": 256, "num_heads": 4,
              "deepstack_visual_indexes": [1]}
MID_LABEL = ("mid (random-weight Qwen3-VL, 36 layers x 256 wide, a benchmark shape whose CPU decode step matches "
             "the 4B model's on a GPU: answers are random text)")
SHAPES = ("demo", "mid")


def ensure_shaped_checkpoint(cache_dir: Path, shape: str) -> Path:
    """Return the checkpoint directory of a named shape under the demo cache, building it if missing."""
    if shape == "demo":
        return ensure_demo_checkpoint(cache_dir)
    if shape != "mid":
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    meta = {"version": MID_VERSION, "demo_version": DEMO_VERSION, "shape": shape, "label": MID_LABEL}
    return ensure_checkpoint(Path(cache_dir) / f"mid-v{MID_VERSION}", meta, MID_TEXT, MID_VISION)
