"""What the engine takes and gives: conversations to continue, their results, and the loaded model's facts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from worker.sampling import SamplingParams

DeltaCallback = Callable[..., None]  # (request_id, text) or, for rows that asked for them, (…, logprobs)
FinishCallback = Callable[["GenerationResult"], None]
CancelCheck = Callable[[list[str]], set[str]]
AdmitCallback = Callable[[int], list["GenerationRequest"]]


@dataclass
class Turn:
    """One message of a conversation: its role, its text and the images it carries."""

    role: str
    text: str
    images: list[Image.Image] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)  # the stored images' ids (per tenant): cache keys


@dataclass
class GenerationRequest:
    """A conversation to continue, with its decoding parameters."""

    request_id: str
    messages: list[Turn]
    params: SamplingParams = field(default_factory=SamplingParams)
    enqueued_at: float | None = None  # epoch seconds, for the queue time
    prepared: Prepared | None = None  # the prompt already built off the decode loop (worker/prepare.py)
    cache_key: str | None = None  # the conversation before this turn: this row may start from its cached prefix
    keep_key: Callable[[str], str] | None = None  # answer -> the key to keep this row's KV cache under (choice 0)


@dataclass
class Prepared:
    """A request's model inputs, built before it joins the running rows: tokens, pixels, dropped turns."""

    features: dict[str, Any]
    truncated_turns: int = 0
    error: str | None = None  # the prompt could not be built: the request fails alone with this message


@dataclass
class GenerationResult:
    """What one request produced, why it stopped, and what it cost."""

    request_id: str
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict[str, float | None] = field(default_factory=dict)
    error_code: str | None = None
    error_message: str | None = None
    logprobs: list[dict[str, Any]] | None = None  # per generated token, when the request asked for them
    image_tokens: int = 0  # of prompt_tokens
    truncated_turns: int = 0  # oldest turns left out to fit the context
    cached_tokens: int = 0  # of prompt_tokens: taken from the session's prefix cache, not computed again
    kept_prefix: str | None = None  # the session whose prefix this row left in the cache (for routing)

    @property
    def usage(self) -> dict[str, int]:
        """Return OpenAI-style token counts."""
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}


@dataclass
class ModelInfo:
    """What is loaded, where, and why it may differ from what was asked for."""

    requested: str
    path: str
    label: str
    is_demo: bool
    device: str
    dtype: str
    parameters: int
    max_context: int
    fallback_reason: str | None = None  # the configured model failed and the demo model serves instead
    device_fallback_reason: str | None = None  # the GPU failed and the CPU serves instead
