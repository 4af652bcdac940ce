"""The engine on the real transformers path with the tiny demo checkpoint (CPU)."""

from __future__ import annotations

import pytest
from PIL import Image

from common.config import Settings
from worker.engine import GenerationRequest, Turn
from worker.sampling import SamplingParams


def ask(rid: str, size=(64, 48), color=(200, 30, 30), prompt: str = "What is in this picture?", **params):
    """Build a one-turn request with one solid-colour image."""
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 16)
    return GenerationRequest(rid, [Turn("user", prompt, [Image.new("RGB", size, color)])], SamplingParams(**params))


def test_loads_real_architecture_through_from_pretrained(engine, settings):
    assert type(engine.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert engine.info.is_demo and "random" in engine.info.label
    assert engine.info.path.startswith(str(settings.demo_dir))
    assert engine.info.device == "cpu" and engine.info.dtype == "float32"
    assert 100_000 < engine.info.parameters < 1_000_000


def test_local_directory_path_loads(engine):
    from worker.loader import load_engine

    other = load_engine(Settings(model=engine.info.path, device="cpu", data_dir=engine.info.path))
    assert other.info.is_demo and other.info.requested == engine.info.path
    assert other.generate([ask("a")])[0].text == engine.generate([ask("a")])[0].text


def test_image_and_prompt_yield_text_with_usage_and_timings(engine):
    result = engine.generate([ask("r1", max_tokens=12)])[0]
    assert result.text
    assert result.finish_reason in ("length", "stop")
    assert 0 < result.completion_tokens <= 12
    # 64x48 is upscaled to the processor's minimum area; its tokens are part of the prompt.
    assert result.prompt_tokens > 20
    assert result.usage["total_tokens"] == result.prompt_tokens + result.completion_tokens
    t = result.timings
    assert t["started_at"] <= t["first_token_at"] <= t["finished_at"]


def test_streamed_deltas_join_to_final_text(engine):
    deltas: dict[str, list[str]] = {}
    requests = [ask(f"s{i}", temperature=1.0, seed=i, max_tokens=40, prompt="请描述这张图片") for i in range(3)]
    results = engine.generate(requests, on_delta=lambda rid, d: deltas.setdefault(rid, []).append(d))
    for result in results:
        assert "".join(deltas[result.request_id]) == result.text
        assert all(deltas[result.request_id])


def test_greedy_is_deterministic(engine):
    first = engine.generate([ask("g")])[0].text
    assert engine.generate([ask("g")])[0].text == first


def test_greedy_alone_equals_greedy_in_padded_batch(engine):
    sizes = [(64, 48), (320, 200), (256, 512), (500, 500)]
    requests = [ask(f"b{i}", size=s, color=(i * 60, 90, 200), max_tokens=24) for i, s in enumerate(sizes)]
    alone = [engine.generate([r])[0] for r in requests]
    together = engine.generate(requests)
    assert len({r.prompt_tokens for r in alone}) == 4  # really different lengths, so really padded
    for a, b in zip(alone, together, strict=True):
        assert a.text == b.text and a.completion_tokens == b.completion_tokens


def test_seed_reproduces_sampled_answer(engine):
    one = engine.generate([ask("x", temperature=1.0, seed=123, max_tokens=30)])[0].text
    two = engine.generate([ask("x", temperature=1.0, seed=123, max_tokens=30)])[0].text
    other = engine.generate([ask("x", temperature=1.0, seed=456, max_tokens=30)])[0].text
    assert one == two
    assert one != other


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate([ask("k")])[0].text
    assert engine.generate([ask("k", temperature=1.5, top_k=1, seed=9)])[0].text == greedy


def test_max_tokens_stop_and_cancel_end_only_their_own_row(engine):
    base = [ask(f"row{i}", color=(30 * i, 200, 40), max_tokens=24) for i in range(4)]
    alone = [engine.generate([r])[0] for r in base]
    text = alone[1].text
    # A stop string that first occurs mid-answer (random weights repeat themselves a lot).
    start = next(i for i in range(4, len(text) - 3) if text.find(text[i:i + 3]) == i)
    stop_text = text[start:start + 3]
    base[0].params.max_tokens = 5
    base[1].params.stop = [stop_text]
    steps = {"n": 0}

    def cancel_row2(ids: list[str]) -> set[str]:
        steps["n"] += 1
        return {"row2"} if steps["n"] > 3 else set()

    out = engine.generate(base, check_cancelled=cancel_row2)
    assert out[0].finish_reason == "length" and out[0].completion_tokens == 5
    assert alone[0].text.startswith(out[0].text)
    assert out[1].finish_reason == "stop" and out[1].text == alone[1].text[: alone[1].text.index(stop_text)]
    assert out[2].finish_reason == "cancelled" and out[2].completion_tokens == 3
    assert alone[2].text.startswith(out[2].text)
    assert out[3].text == alone[3].text and out[3].finish_reason == alone[3].finish_reason


def test_two_turn_conversation_with_two_images(engine):
    first_image, second_image = Image.new("RGB", (96, 64), "red"), Image.new("RGB", (64, 96), "blue")
    turns = [
        Turn("user", "What colour is this?", [first_image]),
        Turn("assistant", "It is red."),
        Turn("user", "And this one?", [second_image]),
    ]
    prompt, images = engine.render(turns)
    assert prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert images == [first_image, second_image]
    assert prompt.index("What colour") < prompt.index("It is red.") < prompt.index("And this one?")
    assert prompt.endswith("<|im_start|>assistant\n")
    features = engine.prepare(GenerationRequest("t", turns))
    assert features["image_grid_thw"].shape[0] == 2
    two_turn = engine.generate([GenerationRequest("t", turns, SamplingParams(temperature=0, max_tokens=8))])[0]
    one_turn = engine.generate([GenerationRequest("o", turns[2:], SamplingParams(temperature=0, max_tokens=8))])[0]
    assert two_turn.prompt_tokens > one_turn.prompt_tokens + 20


def test_text_only_turn(engine):
    request = GenerationRequest("t", [Turn("user", "Hello there")], SamplingParams(temperature=0, max_tokens=6))
    result = engine.generate([request])[0]
    assert result.completion_tokens > 0 and result.finish_reason in ("length", "stop")


def test_over_long_prompt_fails_alone(engine):
    engine.info.max_context, saved = 200, engine.info.max_context
    try:
        big = ask("big", size=(500, 500), max_tokens=10)
        small = ask("small", size=(32, 32), max_tokens=10)
        out = engine.generate([big, small])
    finally:
        engine.info.max_context = saved
    assert out[0].finish_reason == "error" and out[0].error_code == "context_length_exceeded"
    assert out[1].finish_reason == "length" and out[1].text


def test_image_token_count_is_h_over_32_times_w_over_32(engine):
    from worker.processor import image_token_count

    assert image_token_count(engine.processor, 640, 480) == (640 // 32) * (480 // 32)
    assert image_token_count(engine.processor, 1024, 1024) == 32 * 32


def test_demo_fallback_and_loud_label(settings, tmp_path):
    from worker.loader import ModelLoadError, load_engine

    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError):
        load_engine(settings.model_copy(update={"model": missing, "demo_fallback": False}))
    engine = load_engine(settings.model_copy(update={"model": missing, "demo_fallback": True}))
    assert engine.info.is_demo and engine.info.requested == missing
    assert missing in engine.info.fallback_reason


def test_demo_checkpoint_is_deterministic(tmp_path, engine):
    from pathlib import Path

    from worker.demo import checkpoint_digest, ensure_demo_checkpoint

    rebuilt = ensure_demo_checkpoint(tmp_path)
    assert checkpoint_digest(rebuilt) == checkpoint_digest(Path(engine.info.path))


@pytest.mark.gpu
def test_gpu_bf16_generation(settings):
    from worker.loader import load_engine

    gpu = load_engine(settings.model_copy(update={"device": "cuda:0"}))
    assert gpu.info.device == "cuda:0" and gpu.info.dtype == "bfloat16"
    assert gpu.generate([ask("gpu")])[0].text


def _bad_images() -> dict[str, bytes]:
    """Awkward real-world images: each must either work end to end or fail with a named error."""
    import io
    import struct
    import zlib

    from PIL import Image

    def png_header(width: int, height: int) -> bytes:
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        chunk = b"IHDR" + ihdr
        idat = zlib.compress(b"\x00" * 64)
        return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
                + struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
                + b"\x00\x00\x00\x00IEND\xaeB`\x82")

    def encode(image: Image.Image, fmt: str, **kw) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kw)
        return buffer.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("P", (40, 30), i) for i in (1, 2, 3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    good_png = encode(Image.new("RGB", (80, 60), "green"), "PNG")
    return {
        "truncated_png": good_png[: len(good_png) // 2],
        "text_file": b"hello, I am not an image\n",
        "zero_by_zero": png_header(0, 0),
        "bomb_30000": png_header(30000, 30000),
        "cmyk_jpeg": encode(Image.new("CMYK", (50, 40), (0, 255, 255, 0)), "JPEG"),
        "animated_gif": gif.getvalue(),
        "exif_rotated_jpeg": encode(Image.new("RGB", (40, 20), "red"), "JPEG", exif=exif.tobytes()),
    }


@pytest.mark.parametrize("name", list(_bad_images()))
def test_bad_images_work_or_fail_with_named_error(engine, settings, name):
    from common.images import ImageError, normalize_image

    raw = _bad_images()[name]
    try:
        image = normalize_image(raw, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
    except ImageError as exc:
        assert name in {"truncated_png", "text_file", "zero_by_zero", "bomb_30000"}
        assert exc.code == "invalid_image" and exc.status == 400 and str(exc)
        return
    assert name in {"cmyk_jpeg", "animated_gif", "exif_rotated_jpeg"}
    picture = image.to_pil()
    assert picture.mode == "RGB"
    if name == "exif_rotated_jpeg":
        assert picture.size == (20, 40)
    turn = Turn("user", "Describe.", [picture])
    request = GenerationRequest(name, [turn], SamplingParams(temperature=0, max_tokens=4))
    result = engine.generate([request])[0]
    assert result.finish_reason in ("length", "stop") and result.completion_tokens > 0


def test_requests_admitted_between_steps_match_their_solo_greedy_output(engine):
    """Continuous batching: rows that join a running batch (and rows that leave it) change nothing."""
    first = [ask("a", size=(320, 200), max_tokens=30), ask("b", size=(64, 48), max_tokens=6)]
    later = [ask("c", size=(256, 512), max_tokens=20), ask("d", size=(32, 32), color=(9, 9, 9), max_tokens=25)]
    alone = {r.request_id: engine.generate([r])[0].text for r in first + later}
    calls = {"n": 0}

    def admit(running: int) -> list[GenerationRequest]:
        calls["n"] += 1
        if calls["n"] == 4:
            return later[:1]
        if calls["n"] == 9:
            return later[1:]
        return []

    out = engine.generate(first, admit=admit)
    assert [r.request_id for r in out] == ["a", "b", "c", "d"]
    for result in out:
        assert result.text == alone[result.request_id], result.request_id
    assert out[1].finish_reason == "length" and out[1].completion_tokens == 6


def test_admit_starts_work_when_the_batch_is_empty(engine):
    waiting = [ask("late", max_tokens=5)]
    out = engine.generate([], admit=lambda running: [waiting.pop()] if waiting else [])
    assert [r.request_id for r in out] == ["late"] and out[0].completion_tokens == 5


def test_end_of_turn_stops_the_row_with_reason_stop(engine):
    """The eos path: with every other token suppressed, the row ends its turn at once (or after min_tokens)."""
    import torch

    eos = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    vocab = engine.model.lm_head.weight.shape[0]
    saved = engine.suppressed
    engine.suppressed = torch.tensor([i for i in range(vocab) if i != eos])
    try:
        result = engine.generate([ask("eos", max_tokens=50)])[0]
    finally:
        engine.suppressed = saved
    assert result.finish_reason == "stop" and result.completion_tokens == 1 and result.text == ""


def test_a_row_whose_sampling_breaks_fails_alone_and_tiny_temperatures_are_greedy(engine):
    alone = [engine.generate([ask(f"a{i}", color=(40 * i, 90, 90))])[0].text for i in range(2)]
    rows = [ask("a0", color=(0, 90, 90)), ask("nan", temperature=float("nan"), seed=1),
            ask("tiny", temperature=1e-300, color=(40, 90, 90)), ask("a1", color=(40, 90, 90))]
    out = {r.request_id: r for r in engine.generate(rows)}
    assert out["nan"].finish_reason == "error" and out["nan"].error_code == "generation_failed"
    assert "sampling failed" in out["nan"].error_message
    assert [out["a0"].text, out["a1"].text] == alone  # the innocent rows are untouched
    assert out["tiny"].text == alone[1] and out["tiny"].finish_reason != "error"  # 1e-300 samples as greedy


def test_a_runaway_generation_ends_at_its_wall_clock_limit(engine):
    result = engine.generate([ask("slow", max_tokens=2048, min_tokens=2048, max_seconds=0.05)])[0]
    assert result.finish_reason == "time_limit" and 0 < result.completion_tokens < 2048 and result.text


def test_a_conversation_longer_than_the_context_drops_its_oldest_turns(engine, monkeypatch):
    monkeypatch.setattr(engine.info, "max_context", 360)
    long = "Tell me everything about this picture in great detail please. " * 6
    turns = [Turn("system", "You are terse.")]
    for i in range(4):
        turns += [Turn("user", f"{i}: {long}", [Image.new("RGB", (64, 48), (i * 50, 10, 10))]),
                  Turn("assistant", long)]
    turns.append(Turn("user", "And now?"))
    result = engine.generate([GenerationRequest("long", turns, SamplingParams(temperature=0, max_tokens=8))])[0]
    assert result.finish_reason != "error", result.error_message
    assert result.truncated_turns % 2 == 0 and 2 <= result.truncated_turns <= 8
    assert result.prompt_tokens + 8 <= 360
    # Keeping one more pair would not have fitted: the fewest turns were dropped, the system turn kept.
    request = GenerationRequest("probe", turns, SamplingParams(max_tokens=8))
    one_more = turns[:1] + turns[1 + result.truncated_turns - 2:]
    assert int(engine.prepare(request, one_more)["input_ids"].shape[1]) + 8 > 360
    kept = turns[:1] + turns[1 + result.truncated_turns:]
    assert int(engine.prepare(request, kept)["input_ids"].shape[1]) == result.prompt_tokens
    monkeypatch.setattr(engine.info, "max_context", 20)
    alone = engine.generate([GenerationRequest("x", turns[-1:], SamplingParams(temperature=0, max_tokens=8))])[0]
    assert alone.finish_reason == "error" and alone.error_code == "context_length_exceeded"
