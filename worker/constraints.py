"""Hold constrained rows to their grammar: each row's matcher masks the tokens its grammar forbids next."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from common.grammar import LIMITS, GrammarError, format_key, grammar_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompiledGrammar:
    """A response_format compiled against the model's vocabulary, ready for rows to copy."""

    key: str
    template: llguidance.LLMatcher  # never advanced; each row decodes with a deep copy (~10 µs vs ~1 ms anew)
    words: int  # int32 words in one row's bitmask


class GrammarCompiler:
    """Compile response_formats for one tokenizer and logits width, keeping the recent ones."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int] | None = None,
                 cache_size: int = 128) -> None:
        # Pass the engine's eos_ids: these are the ids the grammar allows once the answer is complete.
        eos = sorted(set(eos_ids)) if eos_ids else [tokenizer.eos_token_id]
        # llguidance refuses a vocabulary smaller than the tokenizer's; a wider one gets ids it never allows.
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=max(vocab_size, len(tokenizer)),
                                                      eos_token=eos)
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()

    def compile(self, response_format: dict[str, Any]) -> CompiledGrammar:
        """Return the compiled grammar for a json_object or json_schema response_format."""
        key = format_key(response_format)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        grammar = grammar_for(response_format)
        if grammar is None:
            raise GrammarError("response_format type 'text' does not constrain decoding")
        template = llguidance.LLMatcher(self.tokenizer, grammar, limits=LIMITS)
        if template.is_error():
            raise GrammarError(f"cannot compile the JSON Schema for this model: {template.get_error()}")
        compiled = CompiledGrammar(key, template, (self.tokenizer.vocab_size + 31) // 32)
        self._cache[key] = compiled
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return compiled


class RowConstraint:
    """One row's grammar state: which tokens may come next, and whether the answer is complete."""

    def __init__(self, grammar: CompiledGrammar) -> None:
        self.grammar = grammar
        self.matcher = grammar.template.deep_copy()
        self.error: str | None = None

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of every token the grammar forbids next to -inf, in place (1-D, vocab wide)."""
        mask_rows([self], logits.unsqueeze(0))

    def accept(self, token_id: int) -> None:
        """Advance the grammar by the chosen token."""
        if not self.matcher.consume_token(token_id):
            # Only a sampler that ignored the mask gets here; the row then ends (done) rather than the batch.
            self.error = self.matcher.get_error()
            log.error("constrained row took token %d outside its grammar: %s", token_id, self.error)

    @property
    def done(self) -> bool:
        """Tell whether the grammar is complete and nothing but end-of-sequence may follow."""
        return self.matcher.is_stopped()


def mask_rows(constraints: Sequence[RowConstraint | None], logits: torch.Tensor) -> None:
    """Mask the constrained rows of a (rows, vocab) logits tensor in place; None rows decode freely."""
    rows = [(i, c) for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return
    words = rows[0][1].grammar.words
    if any(c.grammar.words != words for _, c in rows):
        raise ValueError("constraints from compilers of different vocabularies cannot share a decode batch")
    bits = torch.empty((len(rows), words), dtype=torch.int32)
    if len(rows) == 1:  # a thread pool round trip costs more than one row's mask
        rows[0][1].matcher.unsafe_compute_mask_ptr(bits.data_ptr(), words * 4)
    else:
        matchers = [(c.matcher, k) for k, (_, c) in enumerate(rows)]
        _executor().unsafe_compute_mask_ptr(matchers, bits.data_ptr(), words * 4, len(rows))
    blocked = _blocked(bits, logits.shape[-1]).to(logits.device)
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(blocked, float("-inf"))
    else:
        index = torch.tensor([i for i, _ in rows], device=logits.device)
        logits[index] = logits[index].masked_fill_(blocked, float("-inf"))


def _blocked(bits: torch.Tensor, width: int) -> torch.Tensor:
    """Unpack (rows, words) int32 bitmasks into a (rows, width) bool tensor that is True where forbidden."""
    known = min(width, bits.shape[1] * 32)
    # Token t is bit t % 32 of word t // 32; on little-endian hosts that is bit t of the bytes, LSB first.
    allowed = np.unpackbits(bits.numpy().view(np.uint8), axis=-1, count=known, bitorder="little")
    blocked = torch.from_numpy(allowed.view(np.bool_)).logical_not_()
    if known < width:  # logits wider than the grammar's vocabulary: those ids are no tokens at all
        blocked = torch.nn.functional.pad(blocked, (0, width - known), value=True)
    return blocked


@cache
def _executor() -> llguidance.LLExecutor:
    """Return the shared thread pool that computes several rows' masks at once (it releases the GIL)."""
    return llguidance.LLExecutor()
