"""Serve ``/v1/chat/completions`` as a vlgate job: build the job from OpenAI's request, render its answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from common.config import Settings
from common.errors import ERROR_STATUS, ApiError
from common.events import ChoiceOutcome, TokenLogprob
from common.ids import to_epoch
from common.images import NormalizedImage, image_from_base64, normalize_image
from common.jobspec import SamplingSpec, StopSpec
from common.models import Job
from web.extensions import Services
from web.openai.media import fetch_image
from web.openai.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    CompletionUsage,
    ImageURL,
    PromptTokensDetails,
    TextPart,
)
from web.services.submit import DraftTurn, submit_turns
from web.services.workers import ready_workers

# vlgate's job finish reasons in OpenAI's words ("abort" for a cancelled job, as vLLM says).
# "time_limit" (VLGATE_MAX_JOB_S) is cut short like "length": the closest of OpenAI's reasons.
FINISH_REASONS = {"stop": "stop", "length": "length", "time_limit": "length", "cancelled": "abort"}


def served_model(settings: Settings) -> str:
    """Return the model id ``/v1`` reports and accepts."""
    return settings.served_model_name or settings.model


def parse_request(body: dict[str, Any], settings: Settings) -> ChatCompletionRequest:
    """Validate a chat-completion body against the server's limits; the model must be the one served."""
    context = {"max_tokens_limit": settings.max_tokens_limit, "max_choices": settings.max_choices}
    request = ChatCompletionRequest.model_validate(body, context=context)
    if request.model not in (served_model(settings), settings.model):
        raise ApiError("model_not_found", f"The model `{request.model}` does not exist; this server serves "
                                          f"`{served_model(settings)}`.", 404, param="model")
    return request


def _pixel_budget(image: ImageURL, settings: Settings, where: str) -> int:
    """Return an image's pixel budget: ``detail=low`` is small, ``max_pixels`` asks within the server's cap."""
    budget = settings.low_detail_pixels if image.detail == "low" else settings.max_image_pixels
    if image.max_pixels is not None:
        if not settings.min_image_pixels <= image.max_pixels <= settings.max_image_pixels:
            raise ApiError("invalid_request", f"{where}.max_pixels: must be from {settings.min_image_pixels} to "
                                              f"{settings.max_image_pixels}", param=f"{where}.max_pixels")
        budget = min(budget, image.max_pixels)
    return min(budget, settings.max_image_pixels)


def _check_url(image: ImageURL, where: str) -> None:
    """Refuse an image URL that is neither a data: URL nor http(s)."""
    if not image.url.startswith(("data:", "http://", "https://")):
        raise ApiError("invalid_image_url", f"{where}.url: use a data: URL (base64) or an http(s) URL.",
                       param=f"{where}.url")


def _image(image: ImageURL, settings: Settings, where: str) -> NormalizedImage:
    """Decode a data: URL or fetch an allowlisted http(s) URL, then normalise it like every image."""
    budget = _pixel_budget(image, settings, where)
    _check_url(image, where)
    if image.url.startswith("data:"):
        return image_from_base64(image.url, max_bytes=settings.max_image_bytes, max_pixels=budget)
    try:
        raw = fetch_image(image.url, settings)
    except ApiError as exc:
        exc.param = exc.param or f"{where}.url"
        raise
    return normalize_image(raw, max_bytes=settings.max_image_bytes, max_pixels=budget)


def draft_turns(messages: list[ChatMessage], settings: Settings, decode: bool = True) -> list[DraftTurn]:
    """Turn OpenAI messages into the turns the model sees, decoding every image (a bad one is a 400).

    With ``decode`` off, image URLs are checked (scheme, pixel budget) but neither fetched nor decoded, and the
    turns carry no images: how a batch checks every line's shape before it reads any image.
    """
    turns, count, user_images = [], 0, 0
    for m, message in enumerate(messages):
        texts, images = [], []
        for p, part in enumerate(message.content if isinstance(message.content, list) else []):
            if isinstance(part, TextPart):
                texts.append(part.text)
                continue
            count += 1
            if count > settings.max_images_per_request:
                raise ApiError("invalid_request", f"messages: more than {settings.max_images_per_request} images",
                               param="messages")
            where = f"messages.{m}.content.{p}.image_url"
            if decode:
                images.append(_image(part.image_url, settings, where))
            else:
                _pixel_budget(part.image_url, settings, where)
                _check_url(part.image_url, where)
            user_images += message.role == "user"
        if isinstance(message.content, str):
            texts.append(message.content)
        text = "\n".join(texts)
        if len(text) > settings.max_prompt_chars:
            raise ApiError("invalid_request", f"messages.{m}.content: {len(text)} characters; the limit is "
                                              f"{settings.max_prompt_chars}", param=f"messages.{m}.content")
        role = "system" if message.role == "developer" else message.role
        turns.append(DraftTurn(role=role, text=text, images=images))
    if not user_images and not any(t.text.strip() for t in turns if t.role == "user"):
        raise ApiError("invalid_request", "messages: at least one user message with text or an image is needed",
                       param="messages")
    return turns


def job_parts(request: ChatCompletionRequest, settings: Settings) -> tuple[SamplingSpec, StopSpec]:
    """Map OpenAI's sampling and stop fields onto the job spec (server defaults where the request is silent)."""
    constrained = request.response_format is not None and request.response_format.constrains()
    sampling = SamplingSpec(
        temperature=settings.default_temperature if request.temperature is None else request.temperature,
        top_p=request.top_p or 1.0, top_k=max(request.top_k or 0, 0), repetition_penalty=request.repetition_penalty,
        presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty, seed=request.seed,
        n=request.n, logprobs=request.logprobs, top_logprobs=request.top_logprobs or 0,
        response_format=request.response_format.wire() if constrained and request.response_format else None,
    )
    budget = request.max_completion_tokens or request.max_tokens or settings.default_max_tokens
    if request.min_tokens > budget:
        raise ApiError("invalid_request", "min_tokens: must not exceed the token budget", param="min_tokens")
    stop = StopSpec(max_tokens=budget, min_tokens=request.min_tokens, strings=request.stop or [])
    return sampling, stop


def submit_completion(db: Session, services: Services, request: ChatCompletionRequest,
                      before_enqueue: Callable[[Job], None] | None = None) -> Job:
    """Store the request as a job on the chat queue (like any other) and enqueue it."""
    turns = draft_turns(request.messages, services.settings)
    sampling, stop = job_parts(request, services.settings)
    return submit_turns(db, services, turns, sampling, stop, before_enqueue)


@dataclass(frozen=True)
class CompletionIds:
    """What every answer and chunk of one completion repeats: its id, creation time and model."""

    id: str
    created: int
    model: str

    @classmethod
    def of(cls, job: Job, settings: Settings) -> CompletionIds:
        return cls(id=f"chatcmpl-{job.id}", created=int(to_epoch(job.created_at) or 0), model=served_model(settings))


def completion_usage(prompt: int | None, completion: int | None, image_tokens: int | None,
                     cached_tokens: int | None = None) -> CompletionUsage | None:
    """Build OpenAI's usage (with the image and cached shares of the prompt) once the counts are known."""
    if prompt is None or completion is None:
        return None
    details = PromptTokensDetails(cached_tokens=cached_tokens or 0, image_tokens=image_tokens or 0)
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                           prompt_tokens_details=details)


def finish_reason(reason: str | None) -> str | None:
    """Say a job's finish reason in OpenAI's words."""
    return FINISH_REASONS.get(reason or "", reason)


def logprobs_of(entries: list[Any] | None) -> ChoiceLogprobs | None:
    """Wrap per-token log-probabilities in OpenAI's ``{"content": [...]}``."""
    return None if entries is None else ChoiceLogprobs(content=[TokenLogprob.model_validate(e) for e in entries])


def job_choices(job: Job) -> list[ChoiceOutcome]:
    """Return a finished job's choices (a single-choice job without log-probabilities stores none)."""
    if job.choices:
        return [ChoiceOutcome.model_validate(c) for c in job.choices]
    # Cancelled before a worker took it: every choice it asked for ends empty, choice 0 with the job's text.
    n = ((job.spec or {}).get("sampling") or {}).get("n", 1)
    return [ChoiceOutcome(index=i, text=(job.response or "") if i == 0 else "", finish_reason=job.finish_reason)
            for i in range(n)]


def raise_failure(job: Job) -> None:
    """Raise a failed job's error with its status (OpenAI's shape comes from the error handler)."""
    if job.status == "failed":
        code = job.error_code or "generation_failed"
        raise ApiError(code, job.error_message or "generation failed", ERROR_STATUS.get(code, 500))


def completion(job: Job, settings: Settings) -> ChatCompletion:
    """Render a finished job as a ``chat.completion``."""
    raise_failure(job)
    ids = CompletionIds.of(job, settings)
    choices = [Choice(index=c.index, message=AssistantMessage(content=c.text), logprobs=logprobs_of(c.logprobs),
                      finish_reason=finish_reason(c.finish_reason)) for c in job_choices(job)]
    return ChatCompletion(id=ids.id, created=ids.created, model=ids.model, choices=choices,
                          usage=completion_usage(job.prompt_tokens, job.completion_tokens, job.image_tokens,
                                                job.cached_tokens))


def model_cards(services: Services) -> dict[str, Any]:
    """Describe the served model; a demo checkpoint says so (its answers are random text)."""
    settings = services.settings
    workers = ready_workers(services.bus.workers())
    demo = any(w.is_demo for w in workers) or settings.model == "demo"
    label = workers[0].model_label if workers else None
    owner = "vlgate (demo checkpoint: random weights, random answers)" if demo else "vlgate"
    return {"id": served_model(settings), "owned_by": owner, "root": settings.model, "demo": demo, "label": label}
