"""Turn an OpenAI ``response_format`` into a grammar for constrained decoding, or say why it cannot be one.

The grammar engine is llguidance. Its core needs neither torch nor a tokenizer, so the web process checks
a request's schema here at submit time and the worker (``worker.constraints``) compiles the same grammar
against the model's vocabulary.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from llguidance import LLMatcher, LLParserLimits

# Compact JSON only. Grammars that allow free whitespace let a model emit spaces and newlines forever
# (a known failure of other servers); with these the only bytes between tokens are "," and ":".
COMPACT_JSON: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
ANY_OBJECT: dict[str, Any] = {"type": "object"}
FORMAT_TYPES = ("text", "json_object", "json_schema")
# llguidance reads compile options from this schema key; clients must not loosen the whitespace rule with it.
ENGINE_OPTIONS_KEY = "x-guidance"
MAX_MESSAGE = 300  # engine messages can quote a whole schema
# Default resource limits, but errors without the parser state and grammar (they would echo schemas into logs).
LIMITS = LLParserLimits(verbose_errors=False)


class GrammarError(ValueError):
    """A response_format that the grammar engine cannot compile; the message names the problem."""


def schema_of(response_format: dict[str, Any]) -> tuple[dict[str, Any], bool] | None:
    """Return the JSON Schema a response_format asks for and whether it is strict; None for free text."""
    if not isinstance(response_format, dict):
        raise GrammarError("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT, True
    if kind != "json_schema":
        raise GrammarError(f"response_format.type must be one of {', '.join(FORMAT_TYPES)}; got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise GrammarError("response_format.json_schema must be an object when type is 'json_schema'")
    schema = spec.get("schema")
    if schema is None:
        raise GrammarError("response_format.json_schema.schema is required")
    if not isinstance(schema, dict):
        raise GrammarError("response_format.json_schema.schema must be a JSON Schema object")
    return schema, bool(spec.get("strict", False))


def grammar_for(response_format: dict[str, Any]) -> str | None:
    """Return the serialised llguidance grammar for a response_format, or None for free text."""
    return _compiled(format_key(response_format))


def validate_response_format(response_format: dict[str, Any]) -> None:
    """Raise GrammarError when the grammar engine cannot compile this response_format."""
    grammar_for(response_format)


def format_key(response_format: dict[str, Any]) -> str:
    """Serialise a response_format as a cache key (key order kept: it is the order fields are generated in)."""
    try:
        return json.dumps(response_format, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"response_format is not plain JSON: {exc}") from exc


@lru_cache(maxsize=512)
def _compiled(key: str) -> str | None:
    """Build and check the grammar for one serialised response_format (errors are not cached)."""
    found = schema_of(json.loads(key))
    if found is None:
        return None
    schema, strict = found
    schema = {k: v for k, v in schema.items() if k != ENGINE_OPTIONS_KEY}
    # Strict schemas are enforced in full, so a keyword the engine cannot enforce is an error; otherwise
    # (OpenAI's non-strict mode is best effort too) such keywords are ignored.
    options = {**COMPACT_JSON, "lenient": not strict}
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, overrides=options)
    except ValueError as exc:
        raise GrammarError(f"invalid JSON Schema: {exc}") from exc
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, limits=LIMITS)
    if failed:
        raise GrammarError(f"cannot compile the JSON Schema: {_short(messages[0])}")
    return grammar


def _short(message: str) -> str:
    """Shorten an engine message: regex errors span several lines with a caret drawing under the pattern."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "rejected by the grammar engine"
    detail = next((line.removeprefix("error:").strip() for line in lines[1:] if line.startswith("error:")), None)
    text = f"{lines[0].rstrip(':')}: {detail} in /{lines[1]}/" if detail and len(lines) > 2 else lines[0]
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."
