"""Pydantic models: the single description of API bodies, stream events and worker heartbeats."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from common.jobspec import SamplingSpec, StopSpec

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL_STATUSES = ("succeeded", "failed", "cancelled")
FINAL_EVENTS = ("done", "error")  # every stream ends with exactly one of these
MAX_WAIT_S = 600  # the longest a request may wait for its answer (also the OpenAI SDK's default timeout)


def _no_bool(value: Any) -> Any:
    """Refuse true/false where a number is meant (pydantic would read true as 1)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Count = Annotated[int, BeforeValidator(_no_bool)]
Number = Annotated[float, BeforeValidator(_no_bool)]
GREEDY_BELOW = 1e-5  # a temperature under this samples like 0 (as vLLM does): dividing by it overflows
# A prompt needs one character that ``str.strip`` keeps. Spelled out: JSON Schema's ``\S`` (ECMA-262) differs from
# Python's whitespace (U+001C-U+001F, U+0085, U+FEFF). Documented only: the validator says "must not be empty".
NOT_BLANK = "[^\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
SERVER_LIMIT = "x-server-limit"  # in a field's JSON Schema: {keyword: Settings field}; web/openapi.py fills them in


def server_limit(**keywords: str) -> dict[str, Any]:
    """Say which server settings bound a field (JSON Schema keyword -> ``Settings`` field), for the API document.

    The validators read the same settings from the validation context; the document states their values.
    """
    return {SERVER_LIMIT: keywords}


class DocumentedAs:
    """Describe a value in the JSON Schema as ``model`` (inline) while validating it loosely: it is validated as
    one later, with the server's limits in the context."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return handler(self.model.__pydantic_core_schema__)


class Strict(BaseModel):
    """A request body that rejects unknown fields."""

    model_config = ConfigDict(extra="forbid")


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``: a named JSON Schema the answer must follow."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field("response", pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    """The shape the answer must have: free text, any JSON object, or JSON that follows a schema."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "if": {"required": ["type"], "properties": {"type": {"const": "json_schema"}}},
        "then": {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}},
    })

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _compilable(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema: required when type is 'json_schema'")
        from common.grammar import validate_response_format  # the grammar engine, without torch

        validate_response_format(self.wire())
        return self

    def wire(self) -> dict[str, Any]:
        """Return the dict stored in the job spec (OpenAI's own shape)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def constrains(self) -> bool:
        """Tell whether decoding is constrained at all."""
        return self.type != "text"


class GenerationParams(Strict):
    """Decoding parameters accepted wherever a prompt is; out-of-range values are errors, never clamped."""

    temperature: Number | None = Field(None, ge=0.0, le=2.0, description="0 = greedy (so is anything under "
                                                                          "1e-5). Default 0.5.")
    max_tokens: Count | None = Field(None, ge=1, description="1 to VLGATE_MAX_TOKENS_LIMIT (2048). Default 512.",
                                     json_schema_extra=server_limit(maximum="max_tokens_limit"))
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    top_k: Count = Field(0, ge=0, le=1000, description="0 = off.")
    repetition_penalty: Number = Field(1.0, ge=0.01, le=2.0)
    presence_penalty: Number = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: lowers tokens already generated.")
    frequency_penalty: Number = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: lowers tokens by their count.")
    seed: Count | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None, max_length=4, description="Up to 4 strings; one string is a list of one.", json_schema_extra={"anyOf": [
            {"type": "string", "minLength": 1, "maxLength": 64},
            {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 64}, "maxItems": 4},
            {"type": "null"}]})
    min_tokens: Count = Field(0, ge=0, description="Suppress end-of-sequence before this many tokens (as in vLLM); "
                                                   "not more than max_tokens.",
                              json_schema_extra=server_limit(maximum="max_tokens_limit"))
    response_format: ResponseFormat | None = Field(
        None, description="`{\"type\": \"json_object\"}` or `{\"type\": \"json_schema\", \"json_schema\": "
                          "{\"name\", \"schema\"}}`: the answer is constrained to JSON (that follows the schema).")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("response_format", mode="before")
    @classmethod
    def _format_from_text(cls, value: Any) -> Any:
        """Accept the JSON text of a response_format (a multipart form field carries it so)."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError("must be a JSON object such as {\"type\": \"json_object\"}") from exc
        return value

    @field_validator("max_tokens", "min_tokens")
    @classmethod
    def _max_tokens_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = (info.context or {}).get("max_tokens_limit")
        if value is not None and limit is not None and value > limit:
            raise ValueError(f"must be at most {limit}")
        return value

    @model_validator(mode="after")
    def _min_not_above_max(self) -> GenerationParams:
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self

    def job_parts(self, default_temperature: float, default_max_tokens: int) -> tuple[SamplingSpec, StopSpec]:
        """Return the job spec's sampling and stop sections, with the server defaults filled in."""
        constrained = self.response_format is not None and self.response_format.constrains()
        sampling = SamplingSpec(
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, seed=self.seed,
            response_format=self.response_format.wire() if constrained and self.response_format else None,
        )
        stop = StopSpec(max_tokens=self.max_tokens or default_max_tokens, min_tokens=self.min_tokens,
                        strings=self.stop or [])
        return sampling, stop


class ChatRequest(GenerationParams):
    """A user turn: a prompt, optional images (base64), and the session it continues."""

    prompt: str = Field(..., description="The question. Required, not blank.",
                        json_schema_extra={"pattern": NOT_BLANK, **server_limit(maxLength="max_prompt_chars")})
    image: str | None = Field(None, description="One image, standard base64 (a data: URL prefix is accepted).")
    images: list[str] | None = Field(None, description="Several images, same encoding; with `image`, at most "
                                                       "VLGATE_MAX_IMAGES_PER_REQUEST in all.",
                                     json_schema_extra=server_limit(maxItems="max_images_per_request"))
    session_id: str | None = Field(None, pattern=r"^sess_[0-9a-f]{24}$")
    wait: Number | None = Field(None, ge=0, le=MAX_WAIT_S, description="Seconds to wait for the answer before a 202.")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        limit = (info.context or {}).get("max_prompt_chars")
        if limit is not None and len(value) > limit:
            raise ValueError(f"is {len(value)} characters; the limit is {limit}")
        return value

    @model_validator(mode="after")
    def _image_count(self, info: ValidationInfo) -> ChatRequest:
        limit = (info.context or {}).get("max_images")
        count = len(self.all_images())
        if limit is not None and count > limit:
            raise ValueError(f"images: {count} images given; the limit is {limit}")
        return self

    def all_images(self) -> list[str]:
        """Return every image of the request, ``image`` first."""
        return ([self.image] if self.image else []) + list(self.images or [])


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    """Every error answer: HTTP, WebSocket, and stored job errors."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int | None, completion_tokens: int | None) -> Usage | None:
        """Build the token counts once both are known (the one usage builder)."""
        if prompt_tokens is None or completion_tokens is None:
            return None
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class Links(BaseModel):
    self: str
    stream: str


class BatchItemCreate(GenerationParams):
    """One item of a JSON batch: an image (or several) and a prompt, with its own parameters."""

    prompt: str = Field(..., description="The question for this item. Required, not blank.",
                        json_schema_extra={"pattern": NOT_BLANK, **server_limit(maxLength="max_prompt_chars")})
    image: str | None = Field(None, description="One image, standard base64 (a data: URL prefix is accepted).")
    images: list[str] | None = Field(None, description="Several images, same encoding; with `image`, at most "
                                                       "VLGATE_MAX_IMAGES_PER_REQUEST in all.",
                                     json_schema_extra=server_limit(maxItems="max_images_per_request"))
    name: str | None = Field(None, max_length=255, description="A label echoed in the results (e.g. a file name).")

    _prompt_not_blank = field_validator("prompt")(ChatRequest._prompt_not_blank.__func__)  # type: ignore[attr-defined]

    def all_images(self) -> list[str]:
        """Return every image of the item, ``image`` first."""
        return ([self.image] if self.image else []) + list(self.images or [])


class BatchCreate(Strict):
    """``POST /api/batches`` as JSON: the items, and how long to wait (like ``/api/chat``)."""

    # Each item is validated on its own (with the server's limits) so one error names every bad item.
    items: list[Annotated[dict[str, Any], DocumentedAs(BatchItemCreate)]] = Field(
        ..., min_length=1, description="BatchItemCreate objects, in order.")
    wait: Number | None = Field(None, ge=0, le=MAX_WAIT_S, description="Seconds to wait for every item before a 202.")


class BatchCounts(BaseModel):
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0


class BatchLinks(BaseModel):
    self: str
    results: str


class BatchPublic(BaseModel):
    """A batch's progress: counts per status; ``status`` is ``running`` until every item is final."""

    batch_id: str
    status: Literal["running", "completed", "cancelled"]
    total: int
    counts: BatchCounts
    progress: float = Field(..., description="Final items / total, 0 to 1.")
    created_at: str
    links: BatchLinks


class BatchItemResult(BaseModel):
    """One item of a batch's results, in input order."""

    index: int
    job_id: str
    name: str | None = None
    status: JobStatus
    response: str | None = None
    finish_reason: str | None = None
    error: ErrorDetail | None = None
    usage: Usage | None = None


class BatchResults(BaseModel):
    """``POST /api/batch`` (seed form) and ``GET /api/batches/<id>/results``: items in input order."""

    batch_id: str
    status: Literal["running", "completed", "cancelled"] = "completed"
    results: list[BatchItemResult]


class JobAccepted(BaseModel):
    """Answer to a submitted job that is not finished yet (HTTP 202)."""

    job_id: str
    session_id: str | None
    status: JobStatus
    links: Links


class JobPublic(BaseModel):
    """A job as clients see it; ``response`` holds the text so far while it runs."""

    job_id: str
    session_id: str | None
    batch_id: str | None = None
    status: JobStatus
    response: str | None = None
    finish_reason: str | None = None
    error: ErrorDetail | None = None
    usage: Usage | None = None
    timings: dict[str, float | None] | None = None
    model: str | None = None
    truncated_turns: int | None = Field(None, description="Oldest turns left out so the conversation fit the "
                                                          "model's context (the session keeps them all).")
    attempts: int
    created_at: str
    started_at: str | None = None
    first_token_at: str | None = None
    finished_at: str | None = None
    links: Links


class ChatResponse(BaseModel):
    """The seed-compatible answer of ``POST /api/chat``."""

    response: str
    session_id: str
    job_id: str
    status: JobStatus
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: dict[str, float | None] | None = None
    model: str | None = None
    truncated_turns: int | None = Field(None, description="Oldest turns left out so the conversation fit the "
                                                          "model's context (the session keeps them all).")


class MessagePublic(BaseModel):
    role: str
    text: str
    image_ids: list[str]
    job_id: str | None = None
    created_at: str


class SessionPublic(BaseModel):
    session_id: str
    created_at: str
    messages: list[MessagePublic]


class SessionDeleted(BaseModel):
    """Answer to ``DELETE /api/sessions/<id>``."""

    session_id: str
    deleted: bool


class WorkerStatus(BaseModel):
    """One worker's heartbeat, as stored in Redis and shown by ``/api/health``."""

    worker_id: str
    hostname: str
    pid: int
    state: Literal["loading", "idle", "busy", "error"]
    device: str | None = None
    gpu_name: str | None = None
    memory_used_mb: float | None = None
    memory_total_mb: float | None = None
    model: str
    model_label: str | None = None
    is_demo: bool = False
    loaded: bool = False
    error: str | None = None
    fallback_reason: str | None = None
    device_fallback_reason: str | None = None
    jobs_done: int = 0
    current_jobs: list[str] = []
    started_at: float
    last_heartbeat: float
    age_s: float | None = None


class ServiceCheck(BaseModel):
    ok: bool
    error: str | None = None


class HealthPublic(BaseModel):
    status: Literal["ok", "degraded", "down"]
    model_ready: bool
    model: str | None = None
    database: ServiceCheck
    redis: ServiceCheck
    queues: dict[str, int]
    workers: list[WorkerStatus]


class TopLogprob(BaseModel):
    """One candidate token with its log-probability (OpenAI's shape)."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """A generated token's log-probability and, if asked for, the most likely alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceOutcome(BaseModel):
    """One choice of a job that asked for several (``n``) or for log-probabilities."""

    index: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None


class _Event(BaseModel):
    def wire(self) -> dict[str, Any]:
        """Return the event as sent: the optional fields only where they carry something."""
        data = self.model_dump()
        for key in self._optional:
            if data.get(key) in (None, 0):
                data.pop(key, None)
        return data

    _optional: tuple[str, ...] = ()


class TokenEvent(_Event):
    """A text delta of one choice (``index``, 0 unless the job asked for several)."""

    type: Literal["token"] = "token"
    seq: int
    text: str
    index: int = 0
    logprobs: list[TokenLogprob] | None = None

    _optional = ("index", "logprobs")


class DoneEvent(_Event):
    """The job finished: its answer (choice 0), every choice when there are several, usage and timings."""

    type: Literal["done"] = "done"
    seq: int
    response: str
    finish_reason: str | None = None
    status: JobStatus = "succeeded"
    usage: Usage | None = None
    timings: dict[str, float | None] | None = None
    choices: list[ChoiceOutcome] | None = None
    image_tokens: int | None = None
    truncated_turns: int | None = None

    _optional = ("choices", "image_tokens", "truncated_turns")


class ErrorEvent(_Event):
    """The job failed; ``code`` and ``message`` as in the error shape."""

    type: Literal["error"] = "error"
    seq: int
    code: str
    message: str


class ResetEvent(_Event):
    """A retried job starts its text over: followers drop what they showed."""

    type: Literal["reset"] = "reset"
    seq: int
    attempt: int | None = None


StreamEvent = Annotated[TokenEvent | DoneEvent | ErrorEvent | ResetEvent, Field(discriminator="type")]
