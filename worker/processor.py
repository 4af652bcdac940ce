"""Load the Qwen3-VL processor: the stock one where torchvision exists, an image-only twin otherwise."""

from __future__ import annotations

import json
import logging
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<|image_pad|>"


class ImageOnlyProcessor:
    """Qwen3-VL's processor without the video half (which needs torchvision).

    The chat template, the image processor and the image-token expansion are the model's own:
    each ``<|image_pad|>`` becomes (t·h·w)/merge² tokens, exactly as ``Qwen3VLProcessor`` does.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kw: Any) -> str:
        """Render a conversation to the prompt string with the model's chat template."""
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    def __call__(self, text: list[str], images: list[Image.Image] | None = None, **_: Any) -> dict:
        """Tokenize prompts, expanding image placeholders, and preprocess their images."""
        import torch

        features: dict[str, Any] = {}
        grids = None
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            features.update(vision)
            grids = iter(vision["image_grid_thw"].tolist())
        merge = self.image_processor.merge_size**2
        expanded = []
        for prompt in text:
            parts = prompt.split(IMAGE_TOKEN)
            out = parts[0]
            for part in parts[1:]:
                if grids is None:
                    raise ValueError("the prompt has an image placeholder but no image was given")
                t, h, w = next(grids)
                out += "<|placeholder|>" * (t * h * w // merge) + part
            expanded.append(out.replace("<|placeholder|>", IMAGE_TOKEN))
        encoded = self.tokenizer(expanded, return_tensors="pt", padding=True)
        features["input_ids"] = encoded["input_ids"]
        features["attention_mask"] = encoded["attention_mask"]
        features["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).to(torch.int32)
        return features


def _read_chat_template(path: str, local_only: bool) -> str | None:
    """Find the chat template shipped as chat_template.jinja or chat_template.json."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            file = cached_file(path, name, local_files_only=local_only, _raise_exceptions_for_missing_entries=False)
        except OSError:
            file = None
        if not file:
            continue
        with open(file, encoding="utf-8") as handle:
            content = handle.read()
        return json.loads(content)["chat_template"] if name.endswith(".json") else content
    return None


def load_processor(path: str, *, min_pixels: int, max_pixels: int, local_only: bool) -> Any:
    """Return a processor for the checkpoint with the image area bounded to [min_pixels, max_pixels]."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil
    from transformers.utils import is_torchvision_available

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    processor: Any = None
    if is_torchvision_available():
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=local_only)
        except Exception as exc:  # noqa: BLE001 - any failure here has the image-only path as a remedy
            log.warning("stock processor unavailable for %s (%s); using the image-only processor", path, exc)
    if processor is None:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=local_only)
        template = tokenizer.chat_template or _read_chat_template(path, local_only)
        processor = ImageOnlyProcessor(tokenizer, image_processor, template)
    processor.image_processor.size = size
    processor.tokenizer.padding_side = "left"
    return processor


def image_token_count(processor: Any, width: int, height: int) -> int:
    """Return how many LLM tokens an image of this size becomes (H/32 · W/32 for Qwen3-VL, after resizing)."""
    ip = processor.image_processor
    patches = ip.get_number_of_image_patches(height, width, {})
    return patches // (ip.merge_size**2)
