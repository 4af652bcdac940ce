"""Generate answers for a batch of conversations in one forward pass, each row on its own terms."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from common.grammar import GrammarError
from worker.batch import RunningBatch
from worker.constraints import GrammarCompiler, RowConstraint, mask_rows
from worker.faults import device_fault
from worker.generation import (
    AdmitCallback,
    CancelCheck,
    DeltaCallback,
    FinishCallback,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    Prepared,
    Turn,
)
from worker.prefix_cache import PrefixCache, reusable
from worker.prompts import PromptBuilder
from worker.row import Row
from worker.textstream import TokenDecoder
from worker.vision_cache import VisionCache

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "ModelInfo", "Turn"]

log = logging.getLogger(__name__)

class Engine:
    """A loaded model with its processor: prepares prompts and runs batched decoding."""

    def __init__(self, model: Any, processor: Any, info: ModelInfo, vision_cache_bytes: int = 0,
                 prefix_cache_bytes: int = 0) -> None:
        self.model = model
        self.processor = processor
        self.info = info
        self.device = next(model.parameters()).device
        self.tokenizer = processor.tokenizer
        self.decoder = TokenDecoder(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_ids = _eos_ids(model, self.tokenizer)
        suppress = getattr(getattr(model, "generation_config", None), "suppress_tokens", None)
        self.suppressed = torch.tensor(suppress, dtype=torch.long, device=self.device) if suppress else None
        self.image_token_id: int | None = getattr(model.config, "image_token_id", None)
        self._grammars: GrammarCompiler | None = None
        self.prompts = PromptBuilder(processor, info)
        self.vision = VisionCache(vision_cache_bytes)
        self.prefixes = PrefixCache(prefix_cache_bytes)

    @property
    def grammars(self) -> GrammarCompiler:
        """Return the grammar compiler for constrained rows, built on first use (most jobs never need it)."""
        if self._grammars is None:
            vocab = int(self.model.get_output_embeddings().weight.shape[0])
            self._grammars = GrammarCompiler(self.tokenizer, vocab, eos_ids=self.eos_ids)
        return self._grammars

    # -- prompts (worker/prompts.py) -------------------------------------------------------------
    def render(self, messages: Sequence[Turn]) -> tuple[str, list[Image.Image]]:
        """Render a conversation through the model's chat template; return the prompt and its images."""
        return self.prompts.render(messages)

    def prepare(self, request: GenerationRequest, messages: Sequence[Turn] | None = None) -> dict[str, Any]:
        """Tokenize one request (or these of its turns) and preprocess its images."""
        return self.prompts.prepare(request, messages)

    def prepare_ahead(self, request: GenerationRequest) -> Prepared:
        """Build a request's model inputs away from the decode loop (the preparation pool calls this)."""
        return self.prompts.prepare_ahead(request)

    # -- generation ------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_delta: DeltaCallback | None = None,
        on_finish: FinishCallback | None = None,
        check_cancelled: CancelCheck | None = None,
        admit: AdmitCallback | None = None,
    ) -> list[GenerationResult]:
        """Generate requests together; each streams, stops and finishes on its own.

        ``admit(running_rows)`` is asked between decoding steps for more requests to join the running
        batch (continuous batching); the answers of admitted requests are returned after the others.
        """
        results: dict[str, GenerationResult] = {}
        order = [r.request_id for r in requests]

        def finish(result: GenerationResult) -> None:
            results[result.request_id] = result
            if on_finish:
                on_finish(result)

        batch: RunningBatch | None = None
        incoming = list(requests)
        while True:
            if incoming:
                order += [r.request_id for r in incoming if r.request_id not in order]
                fresh = self._prefill(incoming, finish)
                incoming = []
                if fresh is not None:
                    batch = fresh if batch is None else batch.extend(fresh)
            if batch is not None:
                tokens = self._choose(batch, on_delta, finish, check_cancelled)
                if not batch.rows:
                    batch = None
            if admit:
                incoming = admit(len(batch.rows) if batch else 0)
            if batch is not None:
                batch.step(self.model, tokens)
            elif not incoming:
                break
        return [results[rid] for rid in order if rid in results]

    def _prefill(self, requests: Sequence[GenerationRequest], finish: FinishCallback) -> RunningBatch | None:
        """Prepare and prefill requests; one that cannot run fails alone with a named error.

        A row whose session left its prefix in the cache is prefilled alone from that prefix; the others
        together, left-padded. Images go through the vision cache either way.
        """
        rows, prepared, resumed = [], [], []
        for request in requests:
            try:
                features, truncated = self.prompts.build(request)
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                finish(_error_result(request, "invalid_request", f"could not build the prompt: {exc}"))
                continue
            prompt_len = int(features["input_ids"].shape[1])
            if prompt_len + request.params.max_tokens > self.info.max_context:
                finish(_error_result(request, "context_length_exceeded",
                                     f"prompt ({prompt_len} tokens) + max_tokens exceeds the model's "
                                     f"context of {self.info.max_context} tokens", prompt_len))
                continue
            constraint = None
            if request.params.response_format:
                try:
                    constraint = RowConstraint(self.grammars.compile(request.params.response_format))
                except GrammarError as exc:
                    finish(_error_result(request, "invalid_request", f"response_format: {exc}", prompt_len))
                    continue
            ids = features["input_ids"][0].tolist()
            image_tokens = ids.count(self.image_token_id) if self.image_token_id is not None else 0
            row = Row(request, ids, self.decoder, self.device, constraint, image_tokens, truncated)
            row.image_keys = list(features.get("image_keys", []))
            entry = self.prefixes.get(request.cache_key)
            reused = reusable(entry, ids, row.image_keys, self.image_token_id) if entry is not None else 0
            if entry is not None and reused >= MIN_REUSED_TOKENS:
                row.cached_tokens = reused
                resumed.append(RunningBatch.resume(self.model, row, self._collate([features], skip_images=reused),
                                                   entry.layers, reused))
                continue
            rows.append(row)
            prepared.append(features)
        batch = RunningBatch.prefill(self.model, rows, self._collate(prepared)) if rows else None
        for one in resumed:
            batch = one if batch is None else batch.extend(one)
        return batch

    def _keep_prefix(self, batch: RunningBatch, index: int, row: Row) -> None:
        """Keep a finished row's KV cache for its conversation's next turn: the prompt and every token fed back
        (all but the last one sampled; all of them when the row was cancelled before sampling again)."""
        if self.prefixes.max_bytes <= 0:
            return
        fed = row.token_ids if row.finish_reason == "cancelled" else row.token_ids[:-1]
        ids = row.prompt_ids + fed
        if batch.row_length(index) != len(ids):  # never store a cache that does not match its tokens
            log.warning("not caching %s: %d cached positions for %d tokens", row.request.request_id,
                        batch.row_length(index), len(ids))
            return
        key = row.request.keep_key(row.stream.text) if row.request.keep_key else None  # the stored answer
        if key and self.prefixes.fits(batch.row_bytes(index)) and \
                self.prefixes.put(key, ids, row.image_keys, batch.row_cache(index)):
            row.kept_prefix = key
            if row.request.cache_key != key:  # the conversation moved on: its shorter prefix is not needed again
                self.prefixes.discard(row.request.cache_key)

    def _choose(self, batch: RunningBatch, on_delta: DeltaCallback | None, finish: FinishCallback,
                check_cancelled: CancelCheck | None) -> list[int]:
        """Pick every row's next token; finish and drop the rows that are done; return the others' tokens."""
        cancelled = check_cancelled([r.request.request_id for r in batch.rows]) if check_cancelled else set()
        # Log-probabilities come from the model's own distribution, before masks and penalties (vLLM's default).
        raw = {i: torch.log_softmax(batch.logits[i].float(), dim=-1)
               for i, row in enumerate(batch.rows) if row.logprobs is not None}
        constraints = [row.constraint for row in batch.rows]
        if any(constraints):
            mask_rows(constraints, batch.logits)  # every constrained row's grammar mask in one go
        tokens, keep = [], []
        for i, row in enumerate(batch.rows):
            token = None
            if row.request.request_id in cancelled:
                row.finish_reason = "cancelled"
            else:
                try:
                    token = self._advance(row, batch.logits[i], raw.get(i), on_delta)
                except (RuntimeError, ValueError) as exc:
                    if device_fault(exc):
                        raise  # the worker's problem, not this row's
                    log.warning("row %s failed to sample: %s", row.request.request_id, exc)
                    row.finish_reason, row.error = "error", f"sampling failed: {exc}"
            if row.finish_reason:
                tail = row.stream.finish()  # text held back (a possible stop string) belongs to the answer
                if row.request.keep_key is not None and row.finish_reason != "error":
                    self._keep_prefix(batch, i, row)
                row.emit(on_delta, tail)
                finish(row.result())
            else:
                keep.append(i)
                tokens.append(token)
        batch.keep(keep)
        return tokens

    def _advance(self, row: Row, logits: torch.Tensor, raw: torch.Tensor | None,
                 on_delta: DeltaCallback | None) -> int:
        """Pick the row's next token (``raw``: its unmasked log-probabilities, if asked for), stream its text,
        and decide whether the row is done."""
        # A constrained row's grammar, not min_tokens, decides when it may end (its mask allows nothing else).
        counted = row.request.params.min_tokens if row.constraint is not None else row.generated
        token = row.sampler.pick(logits, self.eos_ids, counted, self.suppressed)
        row.generated += 1
        row.token_ids.append(token)
        if row.first_token_at is None:
            row.first_token_at = time.time()
        if token in self.eos_ids:
            row.finish_reason = "stop"
            return token
        if row.constraint is not None:
            row.constraint.accept(token)
            if row.constraint.error:  # only if the mask was bypassed: never pass off broken output as done
                row.finish_reason, row.error = "error", f"the answer left its response_format: {row.constraint.error}"
                return token
        if raw is not None and row.logprobs is not None:
            entry = row.logprob_entry(raw, token)
            row.logprobs.append(entry)
            row.unsent_logprobs.append(entry)
        row.emit(on_delta, row.stream.push(token))
        if row.stream.stopped or (row.constraint is not None and row.constraint.done):
            row.finish_reason = "stop"
        elif row.generated >= row.request.params.max_tokens:
            row.finish_reason = "length"
        elif row.request.params.max_seconds and time.time() - row.started_at > row.request.params.max_seconds:
            row.finish_reason = "time_limit"  # a runaway generation ends; what it wrote so far is kept
        return token

    def _collate(self, prepared: list[dict], skip_images: int = 0) -> dict[str, Any]:
        """Left-pad the rows to one length and encode their images in row order (through the vision cache).

        ``skip_images``: for one row resumed from a cached prefix of that many tokens, the images inside the
        prefix are not encoded (their tokens are not run again).
        """
        width = max(int(p["input_ids"].shape[1]) for p in prepared)
        batch: dict[str, Any] = {}
        for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
            padded = [torch.nn.functional.pad(p[key], (width - p[key].shape[1], 0), value=fill) for p in prepared]
            batch[key] = torch.cat(padded).to(self.device)
        with_images = [p for p in prepared if p.get("pixel_values") is not None]
        if not with_images:
            return batch
        grids = torch.cat([p["image_grid_thw"] for p in with_images])
        batch["image_grid_thw"] = grids.to(self.device)
        pixels = torch.cat([p["pixel_values"] for p in with_images])
        keys = [k for p in with_images for k in p["image_keys"]]
        first = _images_before(prepared[0]["input_ids"][0], self.image_token_id, skip_images) if skip_images else 0
        if first < len(keys):
            skipped_patches = int(grids[:first].prod(-1).sum())
            dtype = next(self.model.parameters()).dtype
            batch["mm_encoder_outputs"] = {"image": self.vision.encode(
                self.model, pixels[skipped_patches:].to(self.device, dtype), grids[first:].to(self.device),
                keys[first:])}
        return batch


MIN_REUSED_TOKENS = 16  # a shorter cached prefix is not worth prefilling its row alone


def _images_before(ids: torch.Tensor, image_token: int | None, length: int) -> int:
    """Return how many images (runs of image tokens) lie wholly in the first ``length`` tokens."""
    if image_token is None:
        return 0
    is_image = (ids[:length] == image_token).int()
    starts = is_image.diff(prepend=torch.zeros(1, dtype=is_image.dtype)) == 1
    return int(starts.sum())


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Collect the end-of-sequence ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _error_result(request: GenerationRequest, code: str, message: str, prompt_tokens: int = 0) -> GenerationResult:
    """Build the result of a request that could not run."""
    return GenerationResult(request.request_id, "", "error", prompt_tokens, 0, {}, code, message)
