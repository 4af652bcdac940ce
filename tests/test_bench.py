"""The engine benchmark: its measurements on the demo model, and the 4B shape builder without allocating it."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from bench.engine import (
    build_random_model,
    compare_batching,
    count_parameters,
    decode_weight_bytes,
    main,
    measure_decode,
    meta_model,
    qwen3_vl_4b_config,
)
from worker.engine import Engine


def test_compare_batching_reports_positive_rates_and_ratio(engine):
    rows = compare_batching(engine, [1, 2], tokens=4, repeats=1)
    assert [r.batch for r in rows] == [1, 2]
    for row in rows:
        assert row.batched_tps > 0 and row.sequential_tps > 0
        assert row.ratio == row.batched_tps / row.sequential_tps


def test_measure_decode_splits_prefill_and_steps(engine):
    rows = measure_decode(engine, [1, 2], tokens=3, repeats=1)
    assert all(r.prefill_s > 0 and r.step_s > 0 and r.tokens_per_s > 0 for r in rows)


def test_cli_prints_the_table(data_dir):
    args = ["--data-dir", str(data_dir), "--device", "cpu", "--tokens", "2", "--batch-sizes", "1,2", "--repeats", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "batched/sequential" in result.output and "torch threads" in result.output


def test_4b_shapes_counted_on_meta_device_only():
    model = meta_model(qwen3_vl_4b_config())
    assert next(model.parameters()).device.type == "meta"
    assert abs(count_parameters(model) - 4.44e9) / 4.44e9 < 0.01
    assert model.config.text_config.vocab_size == 151936
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    # Decode reads the language model and its tied head, not the vision tower.
    assert 3.9e9 < decode_weight_bytes(model) / 4 < 4.1e9


def test_4b_config_takes_the_demo_vision_token_ids():
    ids = {"image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 4}
    config = qwen3_vl_4b_config(ids)
    assert (config.image_token_id, config.video_token_id, config.vision_start_token_id) == (5, 6, 3)


def test_random_materialization_yields_a_working_model(engine):
    # The same meta -> device path as the 4B model, at the demo model's size.
    model = build_random_model(engine.model.config, torch.device("cpu"), torch.float32)
    rope = model.model.language_model.rotary_emb
    assert torch.equal(rope.inv_freq, engine.model.model.language_model.rotary_emb.inv_freq)
    assert torch.equal(rope.original_inv_freq, rope.inv_freq)
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert tied == bool(engine.model.config.tie_word_embeddings)  # the demo unties its head; the 4B ties it
    assert count_parameters(model) == engine.info.parameters
    rows = measure_decode(Engine(model, engine.processor, engine.info), [2], tokens=3, repeats=1)
    assert rows[0].step_s > 0
