"""Text deltas from token ids: never a split character, never a leaked stop string."""

from __future__ import annotations

import random

import pytest

from worker.textstream import TextStream, TokenDecoder, _byte_decoder


@pytest.fixture(scope="module")
def decoder(engine) -> TokenDecoder:
    return engine.decoder


def byte_ids(decoder: TokenDecoder, text: str) -> list[int]:
    """Token ids spelling `text` one byte at a time (the worst case for multi-byte characters)."""
    to_char = {b: ch for ch, b in _byte_decoder().items()}
    return [decoder.tokenizer.convert_tokens_to_ids(to_char[b]) for b in text.encode("utf-8")]


def run(stream: TextStream, ids: list[int]) -> list[str]:
    return [stream.push(i) for i in ids] + [stream.finish()]


def test_chinese_split_into_single_bytes_is_never_emitted_half(decoder):
    text = "这是一张产品照片，颜色：红色。🙂 ok"
    deltas = [d for d in run(TextStream(decoder), byte_ids(decoder, text)) if d]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(deltas) == len(text)  # one delta per complete character


def test_stop_string_is_held_back_and_never_shown(decoder):
    ids = decoder.tokenizer.encode("The price is 42 USD. STOP here and more")
    stream = TextStream(decoder, stop=["STOP", "never"])
    deltas = run(stream, ids)
    assert "".join(deltas) == "The price is 42 USD. " and stream.stopped
    assert not any("S" in d and "T" in d for d in deltas)


def test_a_stop_prefix_that_is_not_a_stop_is_released(decoder):
    ids = decoder.tokenizer.encode("STOnly STOP")
    assert "".join(run(TextStream(decoder, stop=["STOP"]), ids)) == "STOnly "


def test_random_ids_join_to_the_tokenizers_own_decoding(decoder):
    rng = random.Random(7)
    vocab = len(decoder.tokenizer)
    for _ in range(100):
        ids = [rng.randrange(vocab) for _ in range(40)]
        joined = "".join(run(TextStream(decoder), ids))
        assert joined == decoder.tokenizer.decode(ids, skip_special_tokens=True).replace("\x00", "\ufffd")
