"""One request's decoding state inside a running batch: sampler, text stream, grammar, log-probabilities."""

from __future__ import annotations

import time
from typing import Any

import torch

from worker.constraints import RowConstraint
from worker.generation import DeltaCallback, GenerationRequest, GenerationResult
from worker.sampling import RowSampler
from worker.textstream import TextStream, TokenDecoder


class Row:
    """Decoding state of one request inside a running batch."""

    def __init__(self, request: GenerationRequest, prompt_ids: list[int], decoder: TokenDecoder, device: torch.device,
                 constraint: RowConstraint | None, image_tokens: int, truncated_turns: int = 0) -> None:
        self.request = request
        self.prompt_ids = prompt_ids
        self.prompt_len = len(prompt_ids)
        self.token_ids: list[int] = []  # generated, in order
        self.image_keys: list[str | None] = []  # the stored image ids behind the prompt's image runs
        self.cached_tokens = 0  # prompt tokens reused from the session's prefix cache
        self.kept_prefix: str | None = None  # set when this row's KV cache was kept for its session's next turn
        self.image_tokens = image_tokens
        self.truncated_turns = truncated_turns  # oldest turns left out so the conversation fits the context
        self.sampler = RowSampler(request.params, device, prompt_ids)
        self.stream = TextStream(decoder, request.params.stop)
        self.constraint = constraint
        self.logprobs: list[dict[str, Any]] | None = [] if request.params.logprobs else None
        self.unsent_logprobs: list[dict[str, Any]] = []  # waiting for the delta their text appears in
        self.started_at = time.time()
        self.first_token_at: float | None = None
        self.generated = 0
        self.finish_reason: str | None = None
        self.error: str | None = None  # why the row failed alone (finish_reason "error")

    def result(self) -> GenerationResult:
        """Build the final result of this row."""
        done = time.time()
        queued = self.request.enqueued_at
        timings = {
            "queued_at": queued,
            "started_at": self.started_at,
            "first_token_at": self.first_token_at,
            "finished_at": done,
            "queue_ms": (self.started_at - queued) * 1000 if queued else None,
            "time_to_first_token_ms": ((self.first_token_at - self.started_at) * 1000
                                       if self.first_token_at else None),
            "generation_ms": (done - self.started_at) * 1000,
        }
        decode_s = done - (self.first_token_at or done)
        steady = decode_s > 0 and self.generated > 1
        timings["decode_tokens_per_s"] = (self.generated - 1) / decode_s if steady else None
        return GenerationResult(self.request.request_id, self.stream.text, self.finish_reason or "stop",
                                self.prompt_len, self.generated, timings, logprobs=self.logprobs,
                                image_tokens=self.image_tokens, error_code="generation_failed" if self.error else None,
                                error_message=self.error, truncated_turns=self.truncated_turns,
                                cached_tokens=self.cached_tokens, kept_prefix=self.kept_prefix)

    def emit(self, on_delta: DeltaCallback | None, delta: str) -> None:
        """Hand a text delta (with the log-probabilities of the tokens behind it, if asked for) to the caller."""
        if on_delta is None or not (delta or self.unsent_logprobs):
            return
        if self.logprobs is None:
            on_delta(self.request.request_id, delta)
        else:
            sent, self.unsent_logprobs = self.unsent_logprobs, []
            on_delta(self.request.request_id, delta, sent)

    def logprob_entry(self, logprobs: torch.Tensor, token: int) -> dict[str, Any]:
        """Describe the chosen token and the request's ``top_logprobs`` most likely ones in OpenAI's shape."""
        entry = self._token_logprob(token, float(logprobs[token]))
        alternatives = []
        top = self.request.params.top_logprobs
        if top:
            values, ids = torch.topk(logprobs, top)
            alternatives = [self._token_logprob(int(i), float(v)) for v, i in zip(values, ids, strict=True)]
        return {**entry, "top_logprobs": alternatives}

    def _token_logprob(self, token: int, logprob: float) -> dict[str, Any]:
        """Return one token's text, bytes and log-probability."""
        decoder = self.stream.decoder
        raw = decoder.token_bytes(token)
        text = raw.decode("utf-8", "replace") if raw else (decoder.tokenizer.convert_ids_to_tokens(token) or "")
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(raw)}
