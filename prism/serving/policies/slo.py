"""What the scheduling policies take as input: SLOs and requests as plain, frozen data.

The live worker builds these from its engines' `Request`s and the simulator from its
`SimRequest`s; the policies never see either.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SLO:
    """A model's latency objectives."""

    ttft_s: float  # time to first token allowed, from arrival
    tpot_s: float  # time per output token allowed (mean over the request)

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise ValueError(f"SLO times must be positive, got {self}")


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """A request waiting for admission (no KV yet): what admission ordering looks at."""

    request_id: str
    model: str
    arrival_s: float  # on the caller's clock, the same clock as every `now`
    prompt_tokens: int  # tokens still to prefill
    priority: int = 0  # higher is more important


@dataclass(frozen=True, slots=True)
class RunningDecode:
    """A running request holding KV pages: what preemption looks at."""

    request_id: str
    model: str
    arrival_s: float
    pages: int  # pages its KV holds: what preempting it (by recompute) frees
    priority: int = 0  # higher is more important
