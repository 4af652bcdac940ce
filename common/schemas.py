"""Pydantic models: the single description of API bodies and worker heartbeats (generation parameters are in
``common.params``, stream events in ``common.events``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from common.params import NOT_BLANK, DocumentedAs, GenerationParams, Number, Strict, server_limit

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL_STATUSES = ("succeeded", "failed", "cancelled")
MAX_WAIT_S = 600  # the longest a request may wait for its answer (also the OpenAI SDK's default timeout)


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


class CachedTokens(BaseModel):
    cached_tokens: int = Field(0, description="Prompt tokens reused from the session's prefix cache (not computed "
                                              "again), as OpenAI reports prompt caching.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: CachedTokens | None = Field(None, exclude_if=lambda v: v is None,
                                                       description="Present once the worker reported the cache use.")

    @classmethod
    def of(cls, prompt_tokens: int | None, completion_tokens: int | None,
           cached_tokens: int | None = None) -> Usage | None:
        """Build the token counts once both are known (the one usage builder)."""
        if prompt_tokens is None or completion_tokens is None:
            return None
        details = None if cached_tokens is None else CachedTokens(cached_tokens=cached_tokens)
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)


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
    max_batch: int | None = None  # rows it runs together: sized from GPU memory, capped by the setting
    batch_sizing: str | None = None  # how max_batch was chosen
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
