"""Turn one job spec into engine rows (one per choice) and gather the rows' results back into one outcome."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from PIL import Image

from common import jobs
from common.affinity import conversation_key
from common.events import ChoiceOutcome
from common.jobspec import JobSpec
from common.models import Job
from common.queue import CHAT_QUEUE
from worker.engine import GenerationRequest, GenerationResult, Turn
from worker.sampling import SamplingParams

SEPARATOR = "#"  # row ids are "<job id>#<choice index>"; job ids never contain it


def row_id(job_id: str, index: int) -> str:
    """Return the engine request id of a job's choice."""
    return f"{job_id}{SEPARATOR}{index}"


def split_row_id(request_id: str) -> tuple[str, int]:
    """Return (job id, choice index) of an engine request id."""
    job_id, _, index = request_id.rpartition(SEPARATOR)
    return job_id, int(index)


def cache_tenant(job: Job) -> str | None:
    """Return the tenant whose conversation cache a job may use and leave: chats only (batch items never go on)."""
    return job.tenant if job.queue == CHAT_QUEUE else None


def requests_for(job_id: str, spec: JobSpec, images: dict[str, Image.Image], enqueued_at: float | None,
                 max_seconds: float | None = None, tenant: str | None = None) -> list[GenerationRequest]:
    """Build one engine request per choice: the same turns, each choice with its own seed.

    With ``tenant`` (a chat: a conversation that may go on), every choice may start from the cached prefix of
    the turns before its question, and choice 0, the answer a conversation keeps, leaves its own cache for the
    next turn (common/affinity.py).
    """
    cache_key = conversation_key(tenant, spec.turns[:-1]) if tenant is not None and len(spec.turns) > 1 else None
    keep = partial(conversation_key, tenant, spec.turns) if tenant is not None else None
    turns = [Turn(t.role, t.text, [images[i] for i in t.image_ids], list(t.image_ids)) for t in spec.turns]
    s, stop = spec.sampling, spec.stop
    out = []
    for index in range(s.n):
        params = SamplingParams(
            temperature=s.temperature, max_tokens=stop.max_tokens, top_p=s.top_p, top_k=s.top_k,
            repetition_penalty=s.repetition_penalty, seed=None if s.seed is None else s.seed + index,
            stop=list(stop.strings), min_tokens=stop.min_tokens, presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty, logprobs=s.logprobs, top_logprobs=s.top_logprobs,
            response_format=s.response_format, max_seconds=max_seconds,
        )
        out.append(GenerationRequest(row_id(job_id, index), turns, params, enqueued_at=enqueued_at,
                                     cache_key=cache_key, keep_key=keep if index == 0 else None))
    return out


@dataclass
class ChoiceSet:
    """The rows of one job still generating, and the results of those that finished."""

    n: int
    keep_choices: bool  # store every choice (n > 1 or log-probabilities asked for)
    results: dict[int, GenerationResult] = field(default_factory=dict)

    def add(self, index: int, result: GenerationResult) -> bool:
        """Record one choice's result; return whether every choice is now in."""
        self.results[index] = result
        return len(self.results) == self.n

    def outcome(self, model: str | None) -> jobs.Outcome:
        """Fold the choices into the job's one stored outcome (choice 0 is the job's ``response``)."""
        ordered = [self.results[i] for i in range(self.n)]
        first = ordered[0]
        failed = next((r for r in ordered if r.finish_reason == "error"), None)
        if failed is not None:
            return jobs.Outcome("failed", error_code=failed.error_code, error_message=failed.error_message,
                                prompt_tokens=failed.prompt_tokens, model=model)
        cancelled = any(r.finish_reason == "cancelled" for r in ordered)
        choices = None
        if self.keep_choices:
            choices = [ChoiceOutcome(index=i, text=r.text, finish_reason=r.finish_reason,
                                     completion_tokens=r.completion_tokens, logprobs=r.logprobs).model_dump()
                       for i, r in enumerate(ordered)]
        return jobs.Outcome("cancelled" if cancelled else "succeeded", response=first.text,
                            finish_reason=first.finish_reason, prompt_tokens=first.prompt_tokens,
                            completion_tokens=sum(r.completion_tokens for r in ordered), timings=first.timings,
                            model=model, choices=choices, image_tokens=first.image_tokens,
                            truncated_turns=first.truncated_turns or None, cached_tokens=first.cached_tokens)
