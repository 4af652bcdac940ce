"""The OpenAPI 3.1 document, generated from the pydantic models (never written by hand)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from common.config import Settings
from common.errors import ERROR_STATUS
from common.params import SERVER_LIMIT
from web.openapi_operations import (
    API_VERSION,
    AUTH_ERRORS,
    KEY_OPTIONAL,
    KEY_REQUIRED,
    OPERATIONS,
    REF_TEMPLATE,
    SECURITY_SCHEMES,
    Operation,
)


def _schemas() -> tuple[dict[tuple[type[BaseModel], JsonSchemaMode], dict[str, Any]], dict[str, Any]]:
    """Generate every model's schema once, with references into ``components.schemas``."""
    inputs = {op.request for op in OPERATIONS if op.request is not None}
    inputs |= {model for op in OPERATIONS for model in op.body_models}
    outputs = {model for op in OPERATIONS for model, _ in op.responses.values() if isinstance(model, type)}
    outputs |= {op.error_model for op in OPERATIONS}
    outputs |= {model for op in OPERATIONS for model in op.stream_models}
    pairs: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m, "validation") for m in sorted(inputs, key=str)]
    pairs += [(m, "serialization") for m in sorted(outputs, key=str)]
    refs, top = models_json_schema(pairs, ref_template=REF_TEMPLATE)
    return refs, top.get("$defs", {})


def _sse_event(data: list[dict[str, Any]]) -> dict[str, Any]:
    """One Server-Sent Event of a stream (how Schemathesis, and OpenAPI 3.2's ``itemSchema``, read the schema of a
    ``text/event-stream``): its ``data`` is the JSON of one of ``data``'s schemas, or ``[DONE]`` last."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "string", "if": {"const": "[DONE]"},
                     "else": {"contentMediaType": "application/json", "contentSchema": {"anyOf": data}}},
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
        },
    }


def _content(ref: dict[str, Any]) -> dict[str, Any]:
    """Wrap a schema reference as a JSON body."""
    return {"application/json": {"schema": ref}}


def _operation(op: Operation, refs: dict[tuple[type[BaseModel], JsonSchemaMode], dict[str, Any]]) -> dict[str, Any]:
    """Describe one endpoint."""
    responses: dict[str, Any] = {}
    for status, (model, description) in sorted(op.responses.items()):
        answer: dict[str, Any] = {"description": description}
        if isinstance(model, type):
            answer["content"] = _content(refs[(model, "serialization")])
        elif model is not None:
            answer["content"] = {model: {}}
        if status == 200:
            for media in op.text_media:
                answer["content"][media] = {"schema": {"type": "string"}}
            if op.stream_models:
                events = [refs[(event, "serialization")] for event in op.stream_models]
                answer["content"]["text/event-stream"] = {"schema": _sse_event(events)}
        if status == 202:
            answer["headers"] = {"Location": {"description": op.location, "schema": {"type": "string"}}}
        responses[str(status)] = answer
    error_ref = refs[(op.error_model, "serialization")]
    by_status: dict[int, list[str]] = {}
    for code in (*op.errors, *(() if op.public else AUTH_ERRORS), "internal_error"):
        by_status.setdefault(ERROR_STATUS[code], []).append(code)
    for status, codes in sorted(by_status.items()):
        if str(status) not in responses:
            responses[str(status)] = {"description": "Error codes: " + ", ".join(codes), "content": _content(error_ref)}
    spec: dict[str, Any] = {
        "summary": op.summary,
        "operationId": f"{op.method}_{op.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
        "responses": responses,
        "security": KEY_OPTIONAL if op.public else KEY_REQUIRED,
    }
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in op.path_params
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": schema, "description": description}
        for name, schema, description in op.query_params
    ]
    if parameters:
        spec["parameters"] = parameters
    if op.request is not None:
        spec["requestBody"] = {"required": op.body_required, "content": _content(refs[(op.request, "validation")])}
    elif op.body is not None:
        spec["requestBody"] = {"required": True, "content": op.body(lambda model: refs[(model, "validation")])}
    return spec


# Pydantic writes a bound it cannot attach to the number type itself (``Count | None`` with ``ge=1``: the
# type's before-validator is in the way) under its own name, which JSON Schema ignores: the document said
# nothing of the bound. These are the JSON Schema names.
PYDANTIC_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    """Yield every JSON object of a document, each before what it contains (so it may be edited in place)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


@lru_cache(maxsize=1)
def _generated() -> dict[str, Any]:
    """Build the document once; fields bounded by a server setting still carry their ``SERVER_LIMIT`` marker."""
    refs, components = _schemas()
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op, refs)
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "vlgate",
            "version": API_VERSION,
            "description": "Private gateway for Qwen3-VL. Every /api error is {\"error\": {\"code\", \"message\"}}; "
                           "/v1 is OpenAI-compatible and answers errors as {\"error\": {\"message\", \"type\", "
                           "\"param\", \"code\"}}. No string may contain NUL (U+0000) or a lone surrogate. "
                           "When keys are required (docs/security.md), an operation that lists `security` needs an "
                           "API key; without a working one it answers 401. Another tenant's id is a 404.",
        },
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": SECURITY_SCHEMES},
    }
    for schema in _objects(document):
        if schema.get("type") in ("integer", "number"):
            schema.update({keyword: schema.pop(name) for name, keyword in PYDANTIC_BOUNDS.items() if name in schema})
    return document


@lru_cache(maxsize=4)
def _with_limits(limits: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """Return the document with these server limits written in (one per distinct set of limits)."""
    document, values = copy.deepcopy(_generated()), dict(limits)
    for schema in _objects(document):
        schema.update({keyword: values[setting] for keyword, setting in schema.pop(SERVER_LIMIT, {}).items()})
    return document


def openapi_document(settings: Settings | None = None) -> dict[str, Any]:
    """Return the OpenAPI 3.1 document of the JSON API, stating this server's limits (the defaults without settings).

    A request the document calls valid is not refused as invalid: limits that are settings (largest
    ``max_tokens``, prompt length, images per request, ``n``) are written in as they are configured.
    """
    defaults = {name: info.default for name, info in Settings.model_fields.items()}
    values = settings.model_dump() if settings is not None else defaults
    return _with_limits(tuple(sorted((name, value) for name, value in values.items() if isinstance(value, int))))
