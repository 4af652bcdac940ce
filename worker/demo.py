"""Build the tiny random-weight Qwen3-VL checkpoint used offline by tests and the demo."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the recipe changes so cached checkpoints are rebuilt.
DEMO_VERSION = 3
DEMO_LABEL = "demo (tiny random-weight Qwen3-VL: answers are random text)"

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A ChatML template with Qwen-VL vision placeholders, the same shape as Qwen3-VL's own.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for item in message.content %}"
    "{%- if item.type == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item.type == 'text' or 'text' in item %}{{- item.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = [
    "the", "a", "an", "of", "to", "in", "on", "with", "and", "or", "is", "are", "was", "this", "that",
    "image", "picture", "photo", "product", "scan", "design", "mock-up", "red", "green", "blue",
    "white", "black", "small", "large", "left", "right", "top", "bottom", "table", "cup", "bottle",
    "box", "label", "text", "logo", "price", "shows", "contains", "describe", "answer", "question",
    "there", "one", "two", "three", "color", "shape", "background",
]
_CHINESE = "这是一张产品照片图片中有一个红色的杯子请描述图像内容文字标签价格左右上下背景颜色形状设计扫描件"


def _corpus() -> list[str]:
    """Return a deterministic training corpus mixing English, Chinese, digits and Markdown."""
    lines = []
    for i in range(400):
        words = [_WORDS[(i * 7 + j * 13) % len(_WORDS)] for j in range(12)]
        chars = "".join(_CHINESE[(i * 5 + j * 3) % len(_CHINESE)] for j in range(10))
        lines.append(f"{' '.join(words).capitalize()}. {chars}。 **{i}** - `{i * 37 % 1000}`\n")
    return lines


def _build_tokenizer(out: Path):
    """Train a byte-level BPE with the Qwen special tokens and save it as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    fast.save_pretrained(out)
    return fast


# The demo's sizes; a named benchmark shape (worker/shapes.py) overrides some of them.
DEMO_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16,
             "mrope_section": [2, 3, 3]}  # mrope_section must sum to head_dim / 2
DEMO_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
               "deepstack_visual_indexes": [1]}  # deepstack indexes must be below the vision depth


def _build_model(out: Path, tokenizer, text: dict | None = None, vision: dict | None = None) -> None:
    """Create a random Qwen3-VL model (the demo's sizes unless given) with fixed seeds and save it."""
    import torch
    from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = {**DEMO_TEXT, **(text or {})}
    mrope_section = text.pop("mrope_section")
    config = Qwen3VLConfig(
        text_config={
            **text,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": mrope_section,
                "mrope_interleaved": True,
            },
            "initializer_range": 0.3,
            "pad_token_id": ids["<|endoftext|>"],
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={
            **DEMO_VISION,
            **(vision or {}),
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": text["hidden_size"],  # must equal the text hidden size
            "num_position_embeddings": 64,  # must be a perfect square
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        # End-of-turn gets logit 0 among random logits of spread ~2.4, so random weights almost never
        # stop early: demo answers run to max_tokens, which keeps streaming and stop-button demos alive.
        model.lm_head.weight[[ids["<|im_end|>"], ids["<|endoftext|>"]]] = 0.0
    special = set(ids.values()) - {ids["<|im_end|>"], ids["<|endoftext|>"]}
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        # Random weights would otherwise emit lone UTF-8 fragments and control bytes (shown as �) and
        # vision placeholders; real checkpoints need no such list.
        suppress_tokens=sorted(special | set(_unprintable_tokens(tokenizer))),
    )
    model.save_pretrained(out)


def _unprintable_tokens(tokenizer) -> list[int]:  # type: ignore[no-untyped-def]
    """Return the ids of tokens whose bytes are not complete, printable UTF-8 text on their own."""
    from worker.textstream import TokenDecoder

    decoder = TokenDecoder(tokenizer)
    bad = []
    for token_id in range(len(tokenizer)):
        raw = decoder.token_bytes(token_id)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(token_id)
            continue
        if any(ch < " " and ch not in "\n\t" for ch in text):
            bad.append(token_id)
    return bad


def _build_image_processor(out: Path) -> None:
    """Save a Qwen-VL image processor config with Qwen3-VL's patch geometry."""
    from transformers import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": 64 * 32 * 32, "longest_edge": 1024 * 1024},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor.save_pretrained(out)


def ensure_demo_checkpoint(cache_dir: Path) -> Path:
    """Return the demo checkpoint directory, building it atomically if it is missing."""
    return ensure_checkpoint(Path(cache_dir) / f"v{DEMO_VERSION}", {"version": DEMO_VERSION, "label": DEMO_LABEL})


def ensure_checkpoint(target: Path, meta: dict, text: dict | None = None, vision: dict | None = None) -> Path:
    """Return a random-weight checkpoint directory (demo sizes unless given), building it atomically if missing."""
    cache_dir = target.parent
    if (target / "model.safetensors").exists() and (target / "vlgate_demo.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
    try:
        log.warning("building a random-weight checkpoint (%s) in %s", meta["label"], target)
        tokenizer = _build_tokenizer(tmp)
        _build_model(tmp, tokenizer, text, vision)
        _build_image_processor(tmp)
        (tmp / "vlgate_demo.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first: keep its copy.
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_demo_checkpoint(path: str | Path) -> bool:
    """Tell whether a model directory is a vlgate demo checkpoint."""
    return (Path(path) / "vlgate_demo.json").exists()


def checkpoint_label(path: str | Path) -> str:
    """Return the label a random-weight checkpoint carries (the demo's for older builds without one)."""
    try:
        return str(json.loads((Path(path) / "vlgate_demo.json").read_text()).get("label") or DEMO_LABEL)
    except (OSError, ValueError):
        return DEMO_LABEL


def checkpoint_digest(path: Path) -> str:
    """Return a sha256 over the weight file, used to show the build is deterministic."""
    return hashlib.sha256((Path(path) / "model.safetensors").read_bytes()).hexdigest()
