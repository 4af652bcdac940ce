"""The job contract: what every entry point stores for a job and the only thing a worker reads to run it.

`/api/chat`, `/api/jobs`, `/ws/chat`, batch items and `/v1/chat/completions` each turn their request
into one :class:`JobSpec`: the turns the model sees, how to sample, and when to stop. The worker
never needs to know which API a job came from. Unknown keys are an error (``extra="forbid"``), so a
spec written by a newer web is refused loudly by an older worker instead of being half-obeyed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SPEC_VERSION = 1
MAX_CHOICES = 16  # the schema's bound; the server's own limit (VLGATE_MAX_CHOICES) is checked at the API
MAX_TOP_LOGPROBS = 20


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TurnSpec(_Spec):
    """One message the model sees: its role, its text, and the stored images it carries, in order."""

    role: Literal["system", "user", "assistant"]
    text: str
    image_ids: list[str] = Field(default_factory=list)


class SamplingSpec(_Spec):
    """How each next token is chosen (already validated and defaulted by the entry point)."""

    temperature: float = Field(0.5, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices generated as rows of the same decode batch.")
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = Field(
        None, description="OpenAI response_format (json_object / json_schema), enforced by constrained decoding.")


class StopSpec(_Spec):
    """When a choice ends: its token budget, stop strings, and tokens before end-of-sequence is allowed."""

    max_tokens: int = Field(512, ge=1)
    min_tokens: int = Field(0, ge=0)
    strings: list[str] = Field(default_factory=list)


class JobSpec(_Spec):
    """Everything a worker needs to run a job, stored on the job row."""

    version: Literal[1] = SPEC_VERSION
    turns: list[TurnSpec] = Field(..., min_length=1)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    stop: StopSpec = Field(default_factory=StopSpec)

    def image_ids(self) -> list[str]:
        """Return every image id of every turn, in order (duplicates kept)."""
        return [image_id for turn in self.turns for image_id in turn.image_ids]

    def stored(self) -> dict[str, Any]:
        """Return the JSON the job row stores."""
        return self.model_dump(mode="json")
