"""Generation parameters accepted wherever a prompt is, and the response_format that constrains an answer.

Their JSON Schema is what the OpenAPI document shows; the server's own limits are named with
``server_limit`` and filled in by ``web/openapi.py``.
"""

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
