"""The benchmark shapes: the mid checkpoint builds offline in seconds, loads, generates, and says it is random."""

from __future__ import annotations

import pytest

from common.config import Settings
from worker.demo import ensure_demo_checkpoint, is_demo_checkpoint
from worker.engine import GenerationRequest, Turn
from worker.sampling import SamplingParams
from worker.shapes import MID_TEXT, ensure_shaped_checkpoint


def test_mid_shape_builds_loads_and_is_labelled_random(tmp_path):
    from worker.loader import load_engine

    path = ensure_shaped_checkpoint(tmp_path, "mid")
    assert is_demo_checkpoint(path) and path == ensure_shaped_checkpoint(tmp_path, "mid")  # cached, not rebuilt
    engine = load_engine(Settings(model=str(path), data_dir=tmp_path, device="cpu", hf_offline=True))
    text = engine.model.config.text_config
    assert text.num_hidden_layers == MID_TEXT["num_hidden_layers"] == 36 and text.hidden_size == 256
    assert engine.info.is_demo and "random" in engine.info.label and engine.info.label.startswith("mid")
    params = SamplingParams(temperature=0.0, max_tokens=3, min_tokens=3)
    [result] = engine.generate([GenerationRequest("r", [Turn("user", "Describe this.", [])], params)])
    assert result.completion_tokens == 3 and result.finish_reason == "length"


def test_demo_shape_is_the_demo_checkpoint_and_unknown_shapes_are_refused(data_dir):
    demo_dir = Settings(data_dir=data_dir).demo_dir
    assert ensure_shaped_checkpoint(demo_dir, "demo") == ensure_demo_checkpoint(demo_dir)
    with pytest.raises(ValueError, match="unknown shape"):
        ensure_shaped_checkpoint(demo_dir, "huge")
