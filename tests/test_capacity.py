"""Batch sizing from GPU memory: Qwen3-VL-4B's KV bytes per token and the rows a device fits, capped."""

from __future__ import annotations

from types import SimpleNamespace

from common.config import Settings
from worker.capacity import CPU_ROWS, kv_bytes_per_token, rows_for_memory, running_rows

GIB = 2**30
QWEN3_VL_4B_TEXT = SimpleNamespace(num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                   hidden_size=2560)


def test_kv_bytes_per_token_of_the_4b_model():
    # 2 (keys, values) x 36 layers x 8 KV heads x 128 dims x 2 bytes (bf16) = 144 KiB per token.
    assert kv_bytes_per_token(QWEN3_VL_4B_TEXT, 2) == 147_456
    no_head_dim = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=None, hidden_size=64)
    assert kv_bytes_per_token(no_head_dim, 4) == 2 * 2 * 4 * 16 * 4  # falls back to attention heads, hidden / heads


def test_rows_follow_free_memory_and_stop_at_the_cap():
    per_token = kv_bytes_per_token(QWEN3_VL_4B_TEXT, 2)
    # An 80 GiB card with the 8 GiB model loaded: 72 GiB free, 8 GiB kept back, 64 GiB / 576 MiB per row.
    h100 = rows_for_memory(72 * GIB, 80 * GIB, 0.1, per_token, 4096, cap=256)
    assert per_token * 4096 == 576 * 2**20
    assert h100.rows == 64 * GIB // (576 * 2**20) == 113
    assert "113 rows" in h100.reason
    small = rows_for_memory(14 * GIB, 24 * GIB, 0.1, per_token, 4096, cap=256)
    assert small.rows == int(14 * GIB - 0.1 * 24 * GIB) // (576 * 2**20) == 20
    assert rows_for_memory(140 * GIB, 141 * GIB, 0.1, per_token, 1024, cap=256).rows == 256  # the setting caps it
    assert rows_for_memory(1 * GIB, 80 * GIB, 0.1, per_token, 4096, cap=256).rows == 1  # never below one row


def test_on_the_cpu_the_setting_or_todays_default_is_the_batch():
    assert running_rows(Settings(), None, "cpu").rows == CPU_ROWS == 8
    assert running_rows(Settings(max_batch=3), None, "cpu").rows == 3
