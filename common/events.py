"""The stream events of a job, typed once: the worker publishes them, the web relays them (WebSocket and SSE)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from common.schemas import JobStatus, Usage

FINAL_EVENTS = ("done", "error")  # every stream ends with exactly one of these


class TopLogprob(BaseModel):
    """One candidate token with its log-probability (OpenAI's shape)."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """A generated token's log-probability and, if asked for, the most likely alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceOutcome(BaseModel):
    """One choice of a job that asked for several (``n``) or for log-probabilities."""

    index: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None


class _Event(BaseModel):
    def wire(self) -> dict[str, Any]:
        """Return the event as sent: the optional fields only where they carry something."""
        data = self.model_dump()
        for key in self._optional:
            if data.get(key) in (None, 0):
                data.pop(key, None)
        return data

    _optional: tuple[str, ...] = ()


class TokenEvent(_Event):
    """A text delta of one choice (``index``, 0 unless the job asked for several)."""

    type: Literal["token"] = "token"
    seq: int
    text: str
    index: int = 0
    logprobs: list[TokenLogprob] | None = None

    _optional = ("index", "logprobs")


class DoneEvent(_Event):
    """The job finished: its answer (choice 0), every choice when there are several, usage and timings."""

    type: Literal["done"] = "done"
    seq: int
    response: str
    finish_reason: str | None = None
    status: JobStatus = "succeeded"
    usage: Usage | None = None
    timings: dict[str, float | None] | None = None
    choices: list[ChoiceOutcome] | None = None
    image_tokens: int | None = None
    truncated_turns: int | None = None
    cached_tokens: int | None = None  # of the prompt tokens, reused from the session's prefix cache

    _optional = ("choices", "image_tokens", "truncated_turns", "cached_tokens")


class ErrorEvent(_Event):
    """The job failed; ``code`` and ``message`` as in the error shape."""

    type: Literal["error"] = "error"
    seq: int
    code: str
    message: str


class ResetEvent(_Event):
    """A retried job starts its text over: followers drop what they showed."""

    type: Literal["reset"] = "reset"
    seq: int
    attempt: int | None = None


StreamEvent = Annotated[TokenEvent | DoneEvent | ErrorEvent | ResetEvent, Field(discriminator="type")]
