"""Pick each row's next token with that row's own parameters and random generator."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import torch

from common.params import GREEDY_BELOW


@dataclass
class SamplingParams:
    """Per-request decoding parameters (validated upstream by the API schemas)."""

    temperature: float = 0.5
    max_tokens: int = 512
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    min_tokens: int = 0  # benchmarks use this so random weights do not stop early
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence of a generated token
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: dict[str, Any] | None = None  # constrained decoding (worker.constraints)
    max_seconds: float | None = None  # wall-clock limit of the generation (the worker's VLGATE_MAX_JOB_S)

    @property
    def greedy(self) -> bool:
        """Tell whether this row decodes greedily (a temperature under 1e-5 would overflow the division)."""
        return self.temperature < GREEDY_BELOW


class RowSampler:
    """Hold one row's generator and apply its penalties, temperature, top-k and top-p."""

    def __init__(self, params: SamplingParams, device: torch.device, prompt_ids: list[int]) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)
        self.seen = set(prompt_ids) if params.repetition_penalty != 1.0 else set()
        # Counts of generated tokens, kept only when an OpenAI-style penalty needs them.
        self.counts: dict[int, int] | None = {} if params.presence_penalty or params.frequency_penalty else None

    def pick(self, logits: torch.Tensor, eos_ids: list[int], generated: int,
             suppressed: torch.Tensor | None = None) -> int:
        """Return the next token id for this row given its float logits over the vocabulary."""
        p = self.params
        logits = logits.float()
        if suppressed is not None:  # the checkpoint's generation_config.suppress_tokens
            logits[suppressed] = float("-inf")
        if p.repetition_penalty != 1.0 and self.seen:
            idx = torch.tensor(sorted(self.seen), device=logits.device)
            picked = logits[idx]
            logits[idx] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        if self.counts:
            idx = torch.tensor(list(self.counts), device=logits.device)
            counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
            logits[idx] -= p.presence_penalty + p.frequency_penalty * counts
        if generated < p.min_tokens and eos_ids:
            logits[eos_ids] = float("-inf")
        if p.greedy:
            token = int(torch.argmax(logits))
        else:
            token = self._sample(logits)
        if p.repetition_penalty != 1.0:
            self.seen.add(token)
        if self.counts is not None:
            self.counts[token] = self.counts.get(token, 0) + 1
        return token

    def _sample(self, logits: torch.Tensor) -> int:
        """Draw from the temperature-scaled, top-k and top-p filtered distribution."""
        p = self.params
        logits = logits / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) > p.top_p  # keep the token crossing top_p
            logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
