"""Every operation of the API, as a table the OpenAPI document is generated from (``web/openapi.py``).

One entry per method and path: its request model, its answers, its errors and whether it needs a key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from common.access import LoginRequest, Ticket, UsageReport, WhoAmI
from common.schemas import (
    MAX_WAIT_S,
    BatchCreate,
    BatchItemCreate,
    BatchPublic,
    BatchResults,
    ChatRequest,
    ChatResponse,
    ErrorResponse,
    HealthPublic,
    JobAccepted,
    JobPublic,
    SessionDeleted,
    SessionPublic,
)
from web.auth import COOKIE
from web.openai.batch_protocol import (
    MAX_EXPIRY_S,
    MIN_EXPIRY_S,
    UPLOAD_PURPOSES,
    BatchCreateRequest,
    BatchList,
    BatchObject,
    FileDeleted,
    FileList,
    FileObject,
)
from web.openai.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ModelCard,
    ModelList,
    OpenAIErrorResponse,
)
from web.services.sessions import SessionFork
from web.services.upload import FORM_FIELDS

API_VERSION = "0.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"

Ref = Callable[[type[BaseModel]], dict[str, Any]]  # a request model -> its schema reference


@dataclass(frozen=True)
class Operation:
    """One endpoint: its request model, its answers by status, and the errors it can give."""

    method: str
    path: str
    summary: str
    responses: dict[int, tuple[type[BaseModel] | str | None, str]]
    request: type[BaseModel] | None = None
    errors: tuple[str, ...] = ()
    path_params: tuple[str, ...] = field(default=())
    query_params: tuple[tuple[str, dict[str, Any], str], ...] = ()  # (name, schema, description)
    body: Callable[[Ref], dict[str, Any]] | None = None  # a request body other than one JSON model
    body_models: tuple[type[BaseModel], ...] = ()  # the models ``body`` refers to
    text_media: tuple[str, ...] = ()  # other media types the 200 answer can have (``?format=``)
    stream_models: tuple[type[BaseModel], ...] = ()  # a 200 ``text/event-stream``: what each event's data holds
    location: str = "The job's URL."
    error_model: type[BaseModel] = ErrorResponse  # /v1 answers errors in OpenAI's shape
    public: bool = False  # answers without a key (web.auth.PUBLIC_ENDPOINTS); a key sent still identifies the caller
    body_required: bool = True


# Sent by every operation that needs a key (when keys are required: docs/security.md); any one of them will do.
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "vlg_<8 hex>_<43 characters>",
               "description": "An API key as `Authorization: Bearer <key>` (what OpenAI clients send)."},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The same key in `X-API-Key`."},
    "cookie": {"type": "apiKey", "in": "cookie", "name": COOKIE,
               "description": "The pages' sign-in, set by `POST /api/auth/login` (HttpOnly, SameSite=Strict)."},
}
KEY_REQUIRED: list[dict[str, list[str]]] = [{name: []} for name in SECURITY_SCHEMES]
KEY_OPTIONAL: list[dict[str, list[str]]] = [{}, *KEY_REQUIRED]  # ``{}``: no key at all is fine too
AUTH_ERRORS = ("missing_api_key", "invalid_api_key", "key_revoked", "key_expired")


_SUBMIT_ERRORS = (
    "invalid_json", "invalid_request", "invalid_image", "image_too_large", "payload_too_large",
    "unsupported_media_type", "session_not_found", "model_not_loaded", "service_unavailable",
)

_WAIT = ("wait", {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S},
         "Seconds to wait for every item to be final before answering 202 (a JSON body's `wait` wins).")
_FORMAT = ("format", {"type": "string", "enum": ["json", "jsonl", "csv"], "default": "json"},
           "`json` (BatchResults), `jsonl` (one BatchItemResult per line) or `csv`.")
_DAY = {"type": "string", "format": "date", "pattern": r"^\d{4}-\d{2}-\d{2}$"}
_USAGE_QUERY = (("since", _DAY, "First day (UTC, included); not after `until`."),
                ("until", _DAY, "Last day (UTC, included)."),
                ("key_id", {"type": "string"}, "Only this key (admins; another key's id is admin_required)."),
                ("tenant", {"type": "string"}, "Only this tenant (admins)."))
_BATCH_ERRORS = ("invalid_json", "invalid_request", "payload_too_large", "unsupported_media_type", "model_not_loaded",
                 "service_unavailable")


def _json_batch(ref: Ref) -> dict[str, Any]:
    """A JSON batch: an object with ``items``, or a bare array of items."""
    items = {"type": "array", "items": ref(BatchItemCreate), "minItems": 1}
    return {"application/json": {"schema": {"oneOf": [ref(BatchCreate), items]}}}


def _form_field(schema: dict[str, Any]) -> dict[str, Any]:
    """Describe a parameter as a form field: text, never null (an absent or empty field means the default)."""
    field = {key: value for key, value in schema.items() if key not in ("anyOf", "default")}
    alternatives = [option for option in schema.get("anyOf", []) if option.get("type") != "null"]
    if len(alternatives) == 1:
        field.update(alternatives[0])
    elif alternatives:
        field["anyOf"] = alternatives
    return field


def _batch_body(ref: Ref) -> dict[str, Any]:
    """A JSON batch, or a bulk upload: the text fields first, then any number of image files."""
    fields = BatchItemCreate.model_json_schema()["properties"]
    properties = {name: _form_field(fields[name]) for name in FORM_FIELDS}
    # JSON Schema's way to say "this text is JSON of that shape" (an annotation: generators send any text).
    properties["response_format"] = {"type": "string", "contentMediaType": "application/json",
                                     "contentSchema": {"$ref": REF_TEMPLATE.format(model="ResponseFormat")},
                                     "description": "A response_format as JSON text."}
    properties["stop"] = {"type": "array", "items": {"type": "string", "maxLength": 64}, "maxItems": 4,
                          "description": "Repeat the field for several stop strings."}
    properties["files"] = {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                           "description": "One image per part, in item order; the item name is the file name."}
    upload = {"type": "object", "required": ["prompt", "files"], "properties": properties,
              "additionalProperties": False, "description": "Send every text field before the first file."}
    return {**_json_batch(ref), "multipart/form-data": {"schema": upload}}


def _file_upload(_ref: Ref) -> dict[str, Any]:
    """A file upload: the file, its purpose, and optionally when it expires (both parts of expires_after)."""
    properties = {
        "file": {"type": "string", "format": "binary", "description": "The JSON Lines file."},
        "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
        "expires_after[seconds]": {"type": "integer", "minimum": MIN_EXPIRY_S, "maximum": MAX_EXPIRY_S},
    }
    upload = {"type": "object", "required": ["file", "purpose"], "properties": properties,
              "additionalProperties": False,
              "dependentRequired": {"expires_after[anchor]": ["expires_after[seconds]"],
                                    "expires_after[seconds]": ["expires_after[anchor]"]}}
    return {"multipart/form-data": {"schema": upload}}


def _page(most: int) -> tuple[tuple[str, dict[str, Any], str], ...]:
    """The cursor paging parameters of a /v1 list."""
    return (("after", {"type": "string", "minLength": 1, "maxLength": 64}, "The last id of the previous page."),
            ("limit", {"type": "integer", "minimum": 1, "maximum": most}, "Objects per page."),
            ("order", {"type": "string", "enum": ["asc", "desc"], "default": "desc"}, "By creation time."))


_PURPOSE = ("purpose", {"type": "string", "enum": ["batch", "batch_output"]}, "Only files of this purpose.")


_KEY_ERRORS = ("invalid_json", "invalid_request", "unsupported_media_type", "payload_too_large", "invalid_api_key",
               "key_revoked", "key_expired")

OPERATIONS: tuple[Operation, ...] = (
    Operation("post", "/api/chat", "Ask about images and wait for the answer (seed-compatible)",
              {200: (ChatResponse, "The finished answer (also when cancelled)."),
               202: (JobAccepted, "Still running after `wait` seconds; poll the job.")},
              request=ChatRequest,
              errors=(*_SUBMIT_ERRORS, "generation_failed", "context_length_exceeded", "worker_lost")),
    Operation("post", "/api/jobs", "Submit a chat turn as a job",
              {202: (JobAccepted, "Queued or running; `Location` names the job."),
               200: (JobPublic, "Finished within `wait` seconds.")},
              request=ChatRequest, errors=_SUBMIT_ERRORS),
    Operation("get", "/api/jobs/{job_id}", "Read a job; `response` is the text so far while it runs",
              {200: (JobPublic, "The job.")}, errors=("job_not_found",), path_params=("job_id",)),
    Operation("delete", "/api/jobs/{job_id}", "Cancel a job (a running one keeps its partial text)",
              {200: (JobPublic, "The job after the cancellation request.")},
              errors=("job_not_found", "service_unavailable"), path_params=("job_id",)),
    Operation("get", "/api/sessions/{session_id}", "Read a conversation's turns",
              {200: (SessionPublic, "The conversation.")}, errors=("session_not_found",),
              path_params=("session_id",)),
    Operation("post", "/api/sessions/{session_id}/fork",
              "Copy a conversation's first messages into a new one (edit a question, regenerate an answer)",
              {201: (SessionPublic, "The new conversation.")}, request=SessionFork, body_required=False,
              errors=("session_not_found", "invalid_request"), path_params=("session_id",)),
    Operation("delete", "/api/sessions/{session_id}", "Delete a conversation and cancel its unfinished jobs",
              {200: (SessionDeleted, "Deleted.")}, errors=("session_not_found",), path_params=("session_id",)),
    Operation("get", "/api/images/{image_id}", "Download a stored (normalised) image",
              {200: ("image/png", "The PNG bytes.")}, errors=("not_found",), path_params=("image_id",)),
    Operation("post", "/api/batch", "Run a JSON array of items and wait for every result (seed-compatible)",
              {200: (BatchResults, "Every item is final; the results are in input order."),
               202: (BatchPublic, "Still running after `wait` seconds (default CHAT_WAIT_S); poll the batch.")},
              body=_json_batch, body_models=(BatchCreate, BatchItemCreate), query_params=(_WAIT,),
              errors=_BATCH_ERRORS, location="The batch's URL."),
    Operation("post", "/api/batches", "Create a batch from JSON items or a multipart upload of many images",
              {202: (BatchPublic, "Stored and queued; `Location` names the batch."),
               200: (BatchResults, "Every item was final within `wait` seconds.")},
              body=_batch_body, body_models=(BatchCreate, BatchItemCreate), query_params=(_WAIT,),
              errors=_BATCH_ERRORS, location="The batch's URL."),
    Operation("get", "/api/batches/{batch_id}", "Read a batch's progress: counts per status",
              {200: (BatchPublic, "The batch.")}, errors=("batch_not_found",), path_params=("batch_id",)),
    Operation("get", "/api/batches/{batch_id}/results", "Read a batch's results in input order",
              {200: (BatchResults, "One result per item, in input order.")},
              text_media=("application/x-ndjson", "text/csv"), query_params=(_FORMAT,),
              errors=("batch_not_found", "invalid_request"), path_params=("batch_id",)),
    Operation("delete", "/api/batches/{batch_id}", "Cancel what has not run of a batch",
              {200: (BatchPublic, "The batch after the cancellation.")},
              errors=("batch_not_found", "service_unavailable"), path_params=("batch_id",)),
    Operation("get", "/api/health", "Database, Redis, queue depths and worker heartbeats (all of it for admins; "
              "`status` and `model_ready` for everyone else)",
              {200: (HealthPublic, "Everything is up and a worker has the model loaded."),
               503: (HealthPublic, "Degraded or down; the same report says why.")}, public=True),
    Operation("get", "/api/usage", "Requests, jobs, images and tokens per key per UTC day (admins: every key)",
              {200: (UsageReport, "The caller's key's days, oldest first (an admin's: every key's), and the sum.")},
              query_params=_USAGE_QUERY, errors=("invalid_request", "admin_required")),
    Operation("get", "/api/openapi.json", "This document", {200: ("application/json", "The OpenAPI document.")},
              public=True),
    Operation("get", "/api/auth/whoami", "Whether this server requires keys, and which key this request carries",
              {200: (WhoAmI, "The mode, and the key (by prefix) if one came and works.")}, public=True),
    Operation("post", "/api/auth/login", "Sign the pages in with a key (in the body, or a header)",
              {200: (WhoAmI, "Signed in: the `vlgate_session` cookie (HttpOnly, SameSite=Strict) is set.")},
              request=LoginRequest, body_required=False, errors=_KEY_ERRORS, public=True),
    Operation("post", "/api/auth/logout", "Forget this browser's sign-in",
              {200: (WhoAmI, "Signed out: the cookie is cleared.")}, errors=("payload_too_large",), public=True),
    Operation("post", "/api/auth/ticket", "A one-use ticket that opens one WebSocket as the caller (`?ticket=`)",
              {200: (Ticket, "The ticket and its lifetime in seconds; 409 `conflict` while the server runs open.")},
              errors=("conflict", "payload_too_large")),
    Operation("get", "/v1/models", "List the served model (OpenAI-compatible)", {200: (ModelList, "The model.")},
              error_model=OpenAIErrorResponse),
    Operation("get", "/v1/models/{model_id}", "Describe the served model (OpenAI-compatible)",
              {200: (ModelCard, "The model.")}, errors=("model_not_found",), path_params=("model_id",),
              error_model=OpenAIErrorResponse),
    Operation("post", "/v1/chat/completions", "Chat completion with images (OpenAI-compatible; `stream` for SSE)",
              {200: (ChatCompletion, "The answer; with `stream: true`, Server-Sent Events of "
                                     "`chat.completion.chunk` ending with `data: [DONE]`.")},
              request=ChatCompletionRequest, stream_models=(ChatCompletionChunk, OpenAIErrorResponse),
              error_model=OpenAIErrorResponse,
              errors=("invalid_json", "invalid_request", "invalid_image", "invalid_image_url", "image_url_timeout",
                      "image_too_large", "payload_too_large", "unsupported_media_type", "model_not_found",
                      "model_not_loaded", "service_unavailable", "generation_failed", "context_length_exceeded",
                      "worker_lost", "generation_timeout")),
    # The Batch API (OpenAI-compatible): files, and batches of chat completions read from them.
    Operation("post", "/v1/files", "Upload a batch input file (multipart, streamed to disk)",
              {200: (FileObject, "The stored file.")}, body=_file_upload, error_model=OpenAIErrorResponse,
              errors=("invalid_request", "payload_too_large", "unsupported_media_type")),
    Operation("get", "/v1/files", "List files, newest first, a page at a time",
              {200: (FileList, "One page; `after` = the last id for the next.")},
              query_params=(*_page(10_000), _PURPOSE), error_model=OpenAIErrorResponse,
              errors=("invalid_request", "file_not_found")),
    Operation("get", "/v1/files/{file_id}", "Describe a file", {200: (FileObject, "The file.")},
              path_params=("file_id",), error_model=OpenAIErrorResponse, errors=("file_not_found",)),
    Operation("get", "/v1/files/{file_id}/content", "Download a file's bytes",
              {200: ("application/octet-stream", "The file, as uploaded or as the batch wrote it (JSON Lines).")},
              path_params=("file_id",), error_model=OpenAIErrorResponse, errors=("file_not_found",)),
    Operation("delete", "/v1/files/{file_id}", "Delete a file", {200: (FileDeleted, "Deleted.")},
              path_params=("file_id",), error_model=OpenAIErrorResponse, errors=("file_not_found",)),
    Operation("post", "/v1/batches", "Create a batch of chat completions from an uploaded file (starts validating)",
              {200: (BatchObject, "The batch, `validating`.")}, request=BatchCreateRequest,
              error_model=OpenAIErrorResponse,
              errors=("invalid_json", "invalid_request", "unsupported_media_type", "payload_too_large",
                      "file_not_found")),
    Operation("get", "/v1/batches", "List batches, newest first, a page at a time",
              {200: (BatchList, "One page; `after` = the last id for the next.")}, query_params=_page(100),
              error_model=OpenAIErrorResponse, errors=("invalid_request", "batch_not_found")),
    Operation("get", "/v1/batches/{batch_id}", "Read a batch: status, counts (live while it runs), files, errors",
              {200: (BatchObject, "The batch.")}, path_params=("batch_id",), error_model=OpenAIErrorResponse,
              errors=("batch_not_found",)),
    Operation("post", "/v1/batches/{batch_id}/cancel", "Cancel a validating or in_progress batch",
              {200: (BatchObject, "The batch, `cancelling` (or already `cancelled`).")}, path_params=("batch_id",),
              error_model=OpenAIErrorResponse, errors=("batch_not_found", "conflict")),
)
