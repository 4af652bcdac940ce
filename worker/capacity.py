"""Size the running batch: on a GPU from its free memory and the KV bytes each row needs, the setting as a cap."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from common.config import Settings

log = logging.getLogger(__name__)

CPU_ROWS = 8  # on the CPU compute, not memory, bounds the batch: more rows only slow every row down
GPU_CAP = 256  # on a GPU with no VLGATE_MAX_BATCH: beyond this the step is compute-bound and latency grows


@dataclass
class BatchSize:
    """How many rows may run together, and why."""

    rows: int
    reason: str


def kv_bytes_per_token(text_config: Any, dtype_bytes: int) -> int:
    """Return the KV-cache bytes one token takes: keys and values, every layer, every KV head."""
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return 2 * text_config.num_hidden_layers * heads * head_dim * dtype_bytes


def rows_for_memory(free_bytes: int, total_bytes: int, margin: float, per_token: int, row_tokens: int,
                    cap: int) -> BatchSize:
    """Return the rows whose KV cache fits in free memory less a margin of the total, at most ``cap``."""
    usable = free_bytes - int(margin * total_bytes)
    fits = max(1, usable // (per_token * row_tokens))
    per_row_mib = per_token * row_tokens / 2**20
    reason = (f"{usable / 2**30:.1f} GiB free for KV cache / ({per_token} B per token x {row_tokens} tokens = "
              f"{per_row_mib:.0f} MiB per row) = {fits} rows")
    if fits > cap:
        return BatchSize(cap, f"{reason}; capped at {cap}")
    return BatchSize(fits, reason)


def running_rows(settings: Settings, model: Any, device: str) -> BatchSize:
    """Return the batch size for this loaded model on its device (after the model's weights are in memory)."""
    if not device.startswith("cuda"):
        rows = settings.max_batch or CPU_ROWS
        return BatchSize(rows, f"{device}: VLGATE_MAX_BATCH" if settings.max_batch else f"{device}: default")
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    free -= int((settings.vision_cache_mb + settings.prefix_cache_mb) * 2**20)  # the caches' budgets come first
    config = getattr(model.config, "text_config", model.config)
    per_token = kv_bytes_per_token(config, next(model.parameters()).element_size())
    return rows_for_memory(free, total, settings.gpu_memory_margin, per_token, settings.row_tokens,
                           settings.max_batch or GPU_CAP)
