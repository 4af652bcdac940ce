"""OpenAI's wire shapes for ``/v1``: the chat-completion request, its answers and chunks, models, errors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator, model_validator

from common.events import TokenLogprob
from common.jobspec import MAX_TOP_LOGPROBS
from common.params import NOT_BLANK, Count, Number, ResponseFormat, server_limit

# Fields that change what a request means and that vlgate does not do yet: refused by name, never ignored.
UNSUPPORTED_FIELDS = {
    "tools": "tool calling", "functions": "function calling", "function_call": "function calling",
    "audio": "audio output", "prediction": "predicted outputs", "logit_bias": "logit_bias",
    "web_search_options": "web search",
}


class _Wire(BaseModel):
    """A request object: unknown harmless fields are ignored, as vLLM and OpenAI do."""

    model_config = ConfigDict(extra="ignore")


class TextPart(_Wire):
    type: Literal["text"]
    text: str = Field(..., description="A message's texts together: at most VLGATE_MAX_PROMPT_CHARS characters.",
                      json_schema_extra=server_limit(maxLength="max_prompt_chars"))


class ImageURL(_Wire):
    url: str = Field(..., min_length=1, description="A data: URL, or http(s) from VLGATE_ALLOWED_MEDIA_DOMAINS.")
    detail: Literal["auto", "low", "high"] = "auto"
    max_pixels: Count | None = Field(None, gt=0, description="vlgate extension: this image's pixel budget.",
                                     json_schema_extra=server_limit(minimum="min_image_pixels",
                                                                    maximum="max_image_pixels"))


class ImagePart(_Wire):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]
PART_TYPES = ("text", "image_url")
# What the model needs at least once: a user message with some text or an image (JSON Schema's ``contains``).
USER_TURN = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"const": "user"},
        "content": {"anyOf": [
            {"type": "string", "pattern": NOT_BLANK},
            {"type": "array", "contains": {"anyOf": [
                {"type": "object", "required": ["type"], "properties": {"type": {"const": "image_url"}}},
                {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"const": "text"}, "text": {"type": "string", "pattern": NOT_BLANK}}},
            ]}},
        ]},
    },
}
# top_logprobs above 0 asks for the alternatives of each token's log-probability: logprobs must be on.
TOP_LOGPROBS_NEED_LOGPROBS = {
    "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
    "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
}


class ChatMessage(_Wire):
    """One message: ``content`` is a string or a list of text and image parts."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = Field(None, json_schema_extra=server_limit(maxLength="max_prompt_chars"))
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_parts(cls, value: Any) -> Any:
        """Name an unsupported part type (audio, files, ...) instead of a union's generic complaint."""
        if isinstance(value, dict):
            if value.get("role") == "tool" or value.get("tool_calls"):
                raise ValueError("tool messages and tool_calls are not supported")
            content = value.get("content")
            for part in content if isinstance(content, list) else []:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in PART_TYPES:
                    raise ValueError(f"content part type {kind!r} is not supported; use 'text' or 'image_url'")
        return value


class StreamOptions(_Wire):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Wire):
    """``POST /v1/chat/completions``: OpenAI's fields plus vLLM's ``top_k``, ``min_tokens``, ``repetition_penalty``."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=TOP_LOGPROBS_NEED_LOGPROBS)

    model: str = Field(..., min_length=1)
    messages: list[ChatMessage] = Field(..., min_length=1, json_schema_extra={"contains": USER_TURN},
                                        description="At least one user message with text or an image.")
    max_completion_tokens: Count | None = Field(None, ge=1, json_schema_extra=server_limit(maximum="max_tokens_limit"))
    max_tokens: Count | None = Field(None, ge=1, description="Deprecated by OpenAI; max_completion_tokens wins.",
                                     json_schema_extra=server_limit(maximum="max_tokens_limit"))
    temperature: Number | None = Field(None, ge=0.0, le=2.0)
    top_p: Number | None = Field(None, gt=0.0, le=1.0)
    n: Count = Field(1, ge=1, json_schema_extra=server_limit(maximum="max_choices"))
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(None, json_schema_extra={"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
        {"type": "null"}]})
    seed: Count | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: Number = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Number = Field(0.0, ge=-2.0, le=2.0)
    logprobs: StrictBool = False  # not 1 or "yes": the document says boolean
    top_logprobs: Count | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Above 0, logprobs must be true.")
    response_format: ResponseFormat | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: Count | None = Field(None, ge=-1, le=1000, description="vLLM extension; -1 or 0 = off.")
    min_tokens: Count = Field(0, ge=0, description="vLLM extension; not more than the token budget.",
                              json_schema_extra=server_limit(maximum="max_tokens_limit"))
    repetition_penalty: Number = Field(1.0, ge=0.01, le=2.0, description="vLLM extension.")
    tool_choice: Any = Field(None, description="Only `none`: tool calling is not supported.",
                             json_schema_extra={"enum": ["none", None]})
    modalities: list[str] | None = Field(None, description="Only `[\"text\"]`.", json_schema_extra={"anyOf": [
        {"type": "array", "items": {"const": "text"}, "minItems": 1, "maxItems": 1}, {"type": "null"}]})

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, value: Any) -> Any:
        """Refuse, by name, the fields whose meaning vlgate cannot honour yet."""
        if isinstance(value, dict):
            for name, feature in UNSUPPORTED_FIELDS.items():
                if value.get(name) not in (None, [], {}):
                    raise ValueError(f"{name}: {feature} is not supported by this server")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> ChatCompletionRequest:
        limits = info.context or {}
        budget = self.max_completion_tokens or self.max_tokens
        if budget is not None and budget > limits.get("max_tokens_limit", budget):
            field = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
            raise ValueError(f"{field}: must be at most {limits['max_tokens_limit']}")
        if self.n > limits.get("max_choices", self.n):
            raise ValueError(f"n: must be at most {limits['max_choices']}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice: tool calling is not supported by this server")
        if self.modalities not in (None, ["text"]):
            raise ValueError("modalities: only ['text'] output is supported")
        return self


# -- answers ---------------------------------------------------------------------------------------
class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Prompt tokens reused from the session's prefix cache (not "
                                              "computed again), as OpenAI reports prompt caching.")
    image_tokens: int = Field(0, description="vlgate: how many of the prompt tokens stand for images.")


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = Field(None, description="What VLGATE_MODEL names (a hub id or a path).")
    demo: bool = Field(False, description="vlgate: the tiny random-weight demo checkpoint serves (random text).")
    label: str | None = Field(None, description="vlgate: what the workers report they serve.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """Every ``/v1`` error: ``{"error": {"message", "type", "param", "code"}}``."""

    error: OpenAIErrorDetail
