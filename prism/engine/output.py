"""What the engine reports back per request and step. Plain data."""

from __future__ import annotations

from dataclasses import dataclass, field

from prism.engine.request import FinishReason, TokenLogprobs


@dataclass(slots=True)
class RequestOutput:
    """The new tokens and text of one request since its previous output."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass(slots=True)
class CompletionOutput:
    """A finished request, as the offline API returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    num_cached_tokens: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)
