"""OpenAI's wire shapes for ``/v1/files`` and ``/v1/batches``: file and batch objects, lists, input and output lines."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from common.params import Count

BATCH_ENDPOINT = "/v1/chat/completions"  # the one endpoint a batch's lines may call
UPLOAD_PURPOSES = ("batch",)  # what a client may upload; "batch_output" files are made by batches
FILE_PURPOSES = ("batch", "batch_output")
BATCH_STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                  "cancelled")
MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 86400  # OpenAI's bounds on expires_after.seconds
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


class ExpiresAfter(BaseModel):
    """When a file expires: ``seconds`` after it was created (the only anchor OpenAI has)."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: Count = Field(..., ge=MIN_EXPIRY_S, le=MAX_EXPIRY_S)


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


Metadata = dict[str, str]
METADATA_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "object", "maxProperties": METADATA_PAIRS,
               "propertyNames": {"maxLength": METADATA_KEY_CHARS},
               "additionalProperties": {"type": "string", "maxLength": METADATA_VALUE_CHARS}},
              {"type": "null"}],
}


def check_metadata(value: Metadata | None) -> Metadata | None:
    """Hold metadata to OpenAI's limits: 16 pairs, keys of 64 characters, values of 512."""
    if value is None:
        return None
    if len(value) > METADATA_PAIRS:
        raise ValueError(f"metadata: at most {METADATA_PAIRS} pairs")
    for key, text in value.items():
        if len(key) > METADATA_KEY_CHARS:
            raise ValueError(f"metadata: the key {key[:20]!r}… is longer than {METADATA_KEY_CHARS} characters")
        if len(text) > METADATA_VALUE_CHARS:
            raise ValueError(f"metadata.{key}: longer than {METADATA_VALUE_CHARS} characters")
    return value


class BatchCreateRequest(BaseModel):
    """``POST /v1/batches``."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(..., min_length=1, max_length=40)
    endpoint: Literal["/v1/chat/completions"] = Field(..., description="The only endpoint vlgate runs in batches.")
    completion_window: str = Field(..., description="`24h` (VLGATE_BATCH_WINDOWS may allow others).",
                                   json_schema_extra={"enum": ["24h"]})
    metadata: Metadata | None = Field(None, json_schema_extra=METADATA_SCHEMA)
    output_expires_after: ExpiresAfter | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: Metadata | None) -> Metadata | None:
        return check_metadata(value)


class BatchErrorItem(BaseModel):
    """One reason a batch failed; ``line`` is the input line (1-based) where there is one."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorItem]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    usage: BatchUsage
    metadata: Metadata | None = None
    model: str | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class LineResponse(BaseModel):
    status_code: StrictInt
    request_id: str
    body: dict[str, Any]


class LineError(BaseModel):
    code: str
    message: str


class OutputLine(BaseModel):
    """One line of an output or error file: the response (success or the OpenAI error), or why it never ran."""

    id: str
    custom_id: str | None
    response: LineResponse | None = None
    error: LineError | None = None
