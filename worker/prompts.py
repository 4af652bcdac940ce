"""Build a request's model inputs: chat template, image preprocessing, and dropping turns that do not fit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from worker.generation import GenerationRequest, ModelInfo, Prepared, Turn

_MODEL_INPUTS = {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}


class PromptBuilder:
    """The CPU half of a request: everything before the model runs (safe to call from any thread)."""

    def __init__(self, processor: Any, info: ModelInfo) -> None:
        self.processor = processor
        self.info = info  # read at each call: the context length is the loaded model's

    def render(self, messages: Sequence[Turn]) -> tuple[str, list[Image.Image]]:
        """Render a conversation through the model's chat template; return the prompt and its images."""
        chat, images = [], []
        for turn in messages:
            content: list[dict[str, str]] = [{"type": "image"} for _ in turn.images]
            content.append({"type": "text", "text": turn.text})
            chat.append({"role": turn.role, "content": content})
            images.extend(turn.images)
        return self.processor.apply_chat_template(chat, add_generation_prompt=True), images

    def prepare(self, request: GenerationRequest, messages: Sequence[Turn] | None = None) -> dict[str, Any]:
        """Tokenize one request (or these of its turns) and preprocess its images (CPU work, before the batch)."""
        turns = request.messages if messages is None else messages
        prompt, images = self.render(turns)
        features = self.processor(text=[prompt], images=images or None, return_tensors="pt")
        prepared: dict[str, Any] = {k: v for k, v in features.items() if k in _MODEL_INPUTS}
        # The vision and prefix caches know an image by its stored id (None: always encoded, never matched).
        prepared["image_keys"] = [t.image_ids[i] if i < len(t.image_ids) else None
                                  for t in turns for i in range(len(t.images))]
        return prepared

    def build(self, request: GenerationRequest) -> tuple[dict[str, Any], int]:
        """Return the request's model inputs and dropped turns: prepared ahead if it was, else built now."""
        ready = request.prepared
        if ready is None:
            return self._fit(request)
        if ready.error is not None:
            raise ValueError(ready.error)
        return ready.features, ready.truncated_turns

    def prepare_ahead(self, request: GenerationRequest) -> Prepared:
        """Build a request's model inputs (CPU work: images, chat template, processor) away from the decode loop."""
        try:
            features, truncated = self._fit(request)
        except Exception as exc:  # noqa: BLE001 - a bad request fails alone when it is admitted
            return Prepared({}, 0, str(exc))
        return Prepared(features, truncated)

    def _fit(self, request: GenerationRequest) -> tuple[dict[str, Any], int]:
        """Prepare a request, dropping its oldest turns (and their images) until prompt + max_tokens fits.

        System turns and the last turn are always kept; a dropped question takes its answer with it. Returns
        the features and how many turns were dropped (the stored conversation keeps them all).
        """
        messages = list(request.messages)
        dropped = 0
        while True:
            features = self.prepare(request, messages)
            if int(features["input_ids"].shape[1]) + request.params.max_tokens <= self.info.max_context:
                return features, dropped
            oldest = next((i for i, turn in enumerate(messages[:-1]) if turn.role != "system"), None)
            if oldest is None:
                return features, dropped  # the last turn alone is too long: the caller says so
            pair = messages[oldest].role == "user" and oldest + 1 < len(messages) - 1 and \
                messages[oldest + 1].role == "assistant"
            del messages[oldest:oldest + (2 if pair else 1)]
            dropped += 2 if pair else 1

