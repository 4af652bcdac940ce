"""Constrained decoding: the demo model, sampled at temperature 1, answers in JSON only when its rows are masked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from common.grammar import GrammarError, grammar_for, validate_response_format
from worker.batch import RunningBatch
from worker.constraints import GrammarCompiler, RowConstraint, mask_rows
from worker.engine import Engine, GenerationRequest, Turn

SEEDS = range(20)
MAX_TOKENS = 200
BOUNDED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "in_stock": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "color", "count", "in_stock", "tags"],
    "additionalProperties": False,
}
JSON_STRING = r'"(?:[^"\\]|\\.)*"'  # a JSON string literal, escapes included
BOUNDED_FORMAT = {"type": "json_schema", "json_schema": {"name": "product", "schema": BOUNDED, "strict": True}}


@pytest.fixture(scope="module")
def compiler(engine: Engine) -> GrammarCompiler:
    """The grammar compiler for the demo tokenizer and its logits width."""
    return GrammarCompiler(engine.tokenizer, engine.model.lm_head.out_features, engine.eos_ids)


def sample(engine: Engine, compiler: GrammarCompiler | None, response_format: dict | None,
           max_tokens: int = MAX_TOKENS) -> list[tuple[str, int, bool]]:
    """Decode one row per seed at temperature 1, masked when a format is given; return (text, tokens, stopped)."""
    features = engine.prepare(GenerationRequest("t", [Turn("user", "Describe the product as JSON.")]))
    inputs = {k: v.expand(len(SEEDS), -1).contiguous() for k, v in features.items() if isinstance(v, torch.Tensor)}
    rows = [RowConstraint(compiler.compile(response_format)) if compiler else None for _ in SEEDS]
    generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
    answers: list[list[int]] = [[] for _ in SEEDS]
    stopped = [False for _ in SEEDS]
    with torch.inference_mode():
        batch = RunningBatch.prefill(engine.model, list(SEEDS), inputs)
        for _ in range(max_tokens):
            tokens = []
            for i, logits in enumerate(batch.logits.float()):
                if rows[i] is not None:
                    rows[i].mask(logits)
                if engine.suppressed is not None:  # as the engine does, after the mask
                    logits[engine.suppressed] = float("-inf")
                token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generators[i]))
                tokens.append(token)
                if stopped[i]:
                    continue
                if token in engine.eos_ids:
                    stopped[i] = True
                    continue
                answers[i].append(token)
                if rows[i] is not None:
                    rows[i].accept(token)
                    stopped[i] = rows[i].done
            if all(stopped):
                break
            batch.step(engine.model, tokens)
    return [(engine.tokenizer.decode(ids), len(ids), done) for ids, done in zip(answers, stopped, strict=True)]


def test_schema_rows_answer_valid_bounded_json(engine: Engine, compiler: GrammarCompiler) -> None:
    for text, tokens, stopped in sample(engine, compiler, BOUNDED_FORMAT):
        assert stopped and tokens < MAX_TOKENS * 3 // 4, (tokens, text)
        jsonschema.validate(json.loads(text), BOUNDED)
        assert not re.search(r"\s", re.sub(JSON_STRING, '""', text)), text  # compact: no whitespace outside strings


def test_free_rows_with_the_same_seeds_are_not_json(engine: Engine) -> None:
    for text, _, _ in sample(engine, None, None, max_tokens=40):
        with pytest.raises(ValueError):
            json.loads(text)


def test_json_object_rows_answer_an_object(engine: Engine, compiler: GrammarCompiler) -> None:
    answers = sample(engine, compiler, {"type": "json_object"})
    # Random weights write long keys, so only some rows close their object within the budget.
    finished = [text for text, _, stopped in answers if stopped]
    assert len(finished) >= 2, answers
    for text in finished:
        assert isinstance(json.loads(text), dict), text
    assert all(text.startswith("{") for text, _, _ in answers)


def test_batched_mask_equals_row_masks_and_leaves_free_rows(engine: Engine, compiler: GrammarCompiler) -> None:
    logits = torch.randn(4, compiler.vocab_size)
    schema, anything = compiler.compile(BOUNDED_FORMAT), compiler.compile({"type": "json_object"})
    rows = [RowConstraint(schema), None, RowConstraint(anything), None]
    rows[0].accept(engine.tokenizer.convert_tokens_to_ids("{"))
    expected = logits.clone()
    for row, line in zip(rows, expected, strict=True):
        if row is not None:
            row.mask(line)
    mask_rows(rows, logits)
    assert torch.equal(logits, expected)
    assert torch.isfinite(logits[[1, 3]]).all()
    assert 0 < int(torch.isfinite(logits[0]).sum()) < compiler.vocab_size


def test_ids_past_the_tokenizer_are_masked_and_eos_ends_a_complete_answer(engine: Engine) -> None:
    width = len(engine.tokenizer) + 70  # lm_heads are often padded past the tokenizer
    compiler = GrammarCompiler(engine.tokenizer, width, engine.eos_ids)
    row = RowConstraint(compiler.compile({"type": "json_object"}))
    for token in engine.tokenizer.encode('{"a":1}'):
        logits = torch.zeros(width)
        row.mask(logits)
        assert torch.isinf(logits[len(engine.tokenizer):]).all()
        assert torch.isinf(logits[engine.eos_ids]).all() and not row.done
        assert torch.isfinite(logits[token])
        row.accept(token)
    logits = torch.zeros(width)
    row.mask(logits)
    assert row.done and torch.isfinite(logits).nonzero().flatten().tolist() == engine.eos_ids


def test_a_token_outside_the_grammar_ends_the_row_not_the_batch(compiler: GrammarCompiler) -> None:
    row = RowConstraint(compiler.compile({"type": "json_object"}))
    row.accept(compiler.tokenizer.tokenize_str("[")[0])
    assert row.done and row.error and "doesn't satisfy the grammar" in row.error


@pytest.mark.parametrize("response_format, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}}}, "unclosed group"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": ["not", "an", "object"]}}, "schema must be"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema is required"),
    ({"type": "yaml"}, "response_format.type"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}, "not"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "[^\\s\\S]"}}},
     "Unsatisfiable"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 2}}},
     "minimum"),
])
def test_bad_formats_raise_a_named_grammar_error(compiler: GrammarCompiler, response_format: dict,
                                                 words: str) -> None:
    with pytest.raises(GrammarError) as caught:
        validate_response_format(response_format)
    assert words in str(caught.value)
    with pytest.raises(GrammarError):
        compiler.compile(response_format)


def test_text_is_free_and_clients_cannot_loosen_whitespace() -> None:
    assert grammar_for({"type": "text"}) is None
    loose = {"type": "object", "x-guidance": {"whitespace_flexible": True}}
    grammar = json.loads(grammar_for({"type": "json_schema", "json_schema": {"name": "x", "schema": loose}}))
    options = grammar["grammars"][0]["json_schema"]["x-guidance"]
    assert options["whitespace_flexible"] is False


def test_the_web_side_validates_without_torch() -> None:
    code = ("import common.grammar as g, sys; g.validate_response_format({'type': 'json_object'}); "
            "assert not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
