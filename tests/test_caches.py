"""The vision-encoder cache and the session prefix cache: same greedy answers, less work, honest counts."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from worker.engine import Engine, GenerationRequest, Turn
from worker.prefix_cache import PrefixCache, reusable
from worker.sampling import SamplingParams
from worker.vision_cache import VisionCache

GREEDY = SamplingParams(temperature=0, max_tokens=12)
MB = 2**20


def photo(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """Return a noisy picture, different for every seed."""
    rng = random.Random(seed)
    return Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))


@pytest.fixture
def engines(engine: Engine) -> tuple[Engine, Engine]:
    """Two engines over the session's demo model: caches on, caches off."""
    cached = Engine(engine.model, engine.processor, engine.info, vision_cache_bytes=64 * MB, prefix_cache_bytes=64 * MB)
    plain = Engine(engine.model, engine.processor, engine.info)
    return cached, plain


def converse(engine: Engine, turns: list[tuple[str, list[tuple[str, Image.Image]]]], session: str | None):
    """Run a conversation turn by turn as the runner does (the history grows with each answer)."""
    history: list[Turn] = []
    results = []
    for i, (text, images) in enumerate(turns):
        history.append(Turn("user", text, [im for _, im in images], [key for key, _ in images]))
        request = GenerationRequest(f"turn{i}", list(history), GREEDY, cache_key=session,
                                    keep_key=(lambda _answer: session) if session else None)
        result = engine.generate([request])[0]
        assert result.finish_reason != "error", result.error_message
        results.append(result)
        history.append(Turn("assistant", result.text))
    return results


def test_a_conversation_answers_the_same_with_caches_and_reuses_its_prefix(engines):
    cached, plain = engines
    a, b = photo(1), photo(2)
    turns = [("What is this?", [("img_a", a)]), ("And the colour?", []), ("Compare with this one.", [("img_b", b)]),
             ("Which is bigger?", []), ("Thanks, and the label?", [])]
    with_cache = converse(cached, turns, "tenant:sess_1")
    without = converse(plain, turns, None)
    assert [r.text for r in with_cache] == [r.text for r in without]
    assert [r.prompt_tokens for r in with_cache] == [r.prompt_tokens for r in without]
    assert with_cache[0].cached_tokens == 0 and all(r.cached_tokens == 0 for r in without)
    for before, now in zip(with_cache, with_cache[1:], strict=False):
        # The previous turn's prompt and all but the re-tokenized tail of its answer come from the cache.
        assert before.prompt_tokens <= now.cached_tokens < now.prompt_tokens
    assert cached.vision.misses == 2  # each picture went through the vision tower once


def test_a_different_picture_of_the_same_size_is_never_taken_from_the_cache(engines):
    cached, plain = engines
    first = converse(cached, [("What is this?", [("img_a", photo(1))])], "tenant:sess_2")[0]
    # Same text, same size, another picture: the session's prefix stops before the image, the answer is its own.
    history = [Turn("user", "What is this?", [photo(3)], ["img_c"]), Turn("assistant", first.text),
               Turn("user", "Sure?")]
    again = cached.generate([GenerationRequest("x", history, GREEDY, cache_key="tenant:sess_2")])[0]
    fresh = plain.generate([GenerationRequest("y", history, GREEDY)])[0]
    assert again.text == fresh.text
    assert again.cached_tokens < first.prompt_tokens - first.prompt_tokens // 2  # only the text before the image


def test_questions_about_one_image_encode_it_once_and_answer_as_without_the_cache(engines):
    cached, plain = engines
    image = photo(7)
    questions = ["What is it?", "What colour?", "Any text?", "How many?"]

    def ask(engine: Engine) -> list[str]:
        requests = [GenerationRequest(f"q{i}", [Turn("user", q, [image], ["img_x"])], GREEDY)
                    for i, q in enumerate(questions)]
        return [r.text for r in engine.generate(requests)]

    assert ask(cached) == ask(plain)
    assert (cached.vision.misses, cached.vision.hits) == (1, 3)
    assert ask(cached) and cached.vision.misses == 1  # asked again: all four from the cache


def test_the_prefix_cache_holds_its_byte_budget_least_recently_used_first():
    layer = (torch.zeros(1, 2, 10, 4), torch.zeros(1, 2, 10, 4))  # 640 bytes a layer
    cache = PrefixCache(max_bytes=1400)
    assert cache.put("a", list(range(10)), [], [layer]) and cache.put("b", list(range(10)), [], [layer])
    assert cache.get("a") is not None  # now "b" is the least recently used
    cache.put("c", list(range(10)), [], [layer])
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.bytes == 1280
    assert not cache.put("huge", list(range(10)), [], [layer, layer, layer])  # bigger than the budget


def test_reusable_stops_at_the_first_differing_or_split_image():
    img = 9
    entry_ids = [1, 2, img, img, img, 3, 4, img, img, 5, 6]
    entry = PrefixCache(1 << 20)
    entry.put("s", entry_ids, ["a", "b"], [(torch.zeros(1, 1, len(entry_ids), 1),) * 2])
    cached = entry.get("s")
    assert cached is not None
    assert reusable(cached, entry_ids + [7, 8], ["a", "b"], img) == len(entry_ids)
    assert reusable(cached, entry_ids + [7, 8], ["a", "z"], img) == 7  # second picture differs: stop before it
    assert reusable(cached, entry_ids + [7, 8], ["z", "b"], img) == 2
    assert reusable(cached, [1, 2, img, img, img, img, 8], ["a"], img) == 2  # a bigger image splits: before it
    assert reusable(cached, entry_ids, ["a", "b"], img) == len(entry_ids) - 1  # one token is always run


def test_the_vision_cache_keeps_its_byte_budget(engine: Engine):
    features = engine.prepare(GenerationRequest("v", [Turn("user", "x", [photo(1), photo(2)], ["k1", "k2"])]))
    pixels, grids = features["pixel_values"], features["image_grid_thw"]
    per_image = None
    cache = VisionCache(max_bytes=1)
    with torch.inference_mode():
        out = cache.encode(engine.model, pixels, grids, ["k1", "k2"])
        per_image = sum(t.numel() * t.element_size() for t in (out.pooler_output[0], *[d[0] for d in
                                                                                        out.deepstack_features]))
        assert cache.bytes == 0  # nothing fits one byte
        roomy = VisionCache(max_bytes=per_image)  # room for exactly one
        roomy.encode(engine.model, pixels, grids, ["k1", "k2"])
    assert roomy.bytes == per_image and roomy.misses == 2


def test_a_turn_keeps_its_cache_under_the_key_its_next_turn_looks_up():
    from common.affinity import conversation_key
    from common.jobspec import TurnSpec

    first = [TurnSpec(role="system", text="Be brief."), TurnSpec(role="user", text="What is it?", image_ids=["i1"])]
    kept = conversation_key("acme", first, "A red cup.")
    following = [*first, TurnSpec(role="assistant", text="A red cup."), TurnSpec(role="user", text="Price?")]
    assert conversation_key("acme", following[:-1]) == kept
    assert conversation_key("other", following[:-1]) != kept  # tenants never share an entry
    assert conversation_key("acme", first, "A blue cup.") != kept


def test_a_cancelled_turn_leaves_its_cache_too(engines, caplog):
    cached, _ = engines
    steps = []

    def cancel_after_three(row_ids: list[str]) -> set[str]:
        steps.append(1)
        return set(row_ids) if len(steps) > 3 else set()

    turn = [Turn("user", "Describe it at length.", [photo(5)], ["img_5"])]
    first = cached.generate([GenerationRequest("c1", turn, SamplingParams(temperature=0, max_tokens=50),
                                               keep_key=lambda _answer: "conv")], check_cancelled=cancel_after_three)[0]
    assert first.finish_reason == "cancelled" and first.kept_prefix == "conv" and "not caching" not in caplog.text
    follow = [*turn, Turn("assistant", first.text), Turn("user", "Go on.")]
    second = cached.generate([GenerationRequest("c2", follow, GREEDY, cache_key="conv")])[0]
    assert second.cached_tokens >= first.prompt_tokens


def test_each_conversation_keeps_only_its_latest_prefix(engines):
    cached, _ = engines
    history = [Turn("user", "What is it?", [photo(9)], ["img_9"])]
    for turn in range(3):
        request = GenerationRequest(f"t{turn}", list(history), GREEDY, cache_key=f"k{turn - 1}" if turn else None,
                                    keep_key=lambda _answer, n=turn: f"k{n}")
        result = cached.generate([request])[0]
        assert result.kept_prefix == f"k{turn}" and (turn == 0 or result.cached_tokens > 0)
        history += [Turn("assistant", result.text), Turn("user", f"More {turn}?")]
    assert len(cached.prefixes) == 1 and cached.prefixes.get("k2") is not None
